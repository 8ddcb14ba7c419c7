"""Stage 4 of the data pipeline: prompts (text chunks with supervised spans, and BOS/EOS markers) -> token ids and
labels (-100 where not supervised).

Each text chunk is tokenized alone, as the family's reference does, and as text only (`split_special_tokens`: `</s>`
written by a user stays characters); special chunks are the tokenizer's ids (BOS and EOS its own, others by name;
a tokenizer without a BOS, as Qwen's, gets none). A text token is supervised when its
characters overlap a supervised span. All chunks of a batch of prompts go to the Rust tokenizer in one call.
"""

from __future__ import annotations

from backbones.prompting import BOS, EOS, Prompt

IGNORE_INDEX = -100


def encode_prompts(prompts: list[Prompt], tokenizer, max_chars: int = 0) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of each prompt. `max_chars` (if set) cuts a prompt's text after that many characters:
    far beyond max_length tokens, it only saves tokenizing what truncation would drop."""
    texts, spans = [], []
    for prompt in prompts:
        budget = max_chars or -1
        for chunk in prompt.chunks:
            if not chunk.special:
                texts.append(chunk.text if budget < 0 else chunk.text[:budget])
                spans.append(chunk.spans)
                budget = budget if budget < 0 else max(0, budget - len(chunk.text))
    pieces = iter(zip(encode_texts(texts, tokenizer), spans))
    specials = {BOS: tokenizer.bos_token_id, EOS: tokenizer.eos_token_id}
    out = []
    for prompt in prompts:
        ids, labels = [], []
        for chunk in prompt.chunks:
            if chunk.special:
                token = special_id(chunk.special, specials, tokenizer)
                if token is None:  # BOS of a tokenizer that has none
                    continue
                ids.append(token)
                labels.append(token if chunk.supervised else IGNORE_INDEX)
                continue
            encoding, chunk_spans = next(pieces)
            ids += encoding.ids
            labels += supervised(encoding, chunk_spans)
        out.append((ids, labels))
    return out


def special_id(name: str, specials: dict, tokenizer) -> int | None:
    if name not in specials:
        token = tokenizer.convert_tokens_to_ids(name)
        if token is None or token == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token) != name:
            raise ValueError(f"the prompt format uses the special token {name!r}, which this tokenizer does not have")
        specials[name] = token
    return specials[name]


def encode_prompt(prompt: Prompt, tokenizer) -> tuple[list[int], list[int]]:
    return encode_prompts([prompt], tokenizer)[0]


def encode_texts(texts: list[str], tokenizer) -> list:
    """The backend (Rust) tokenizer's encodings of `texts`, as `tokenizer(texts, add_special_tokens=False,
    split_special_tokens=True)` computes them, without building its Python dicts (half the time of a batch)."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:  # as the tokenizer's own call without them
        backend.no_truncation()
        backend.no_padding()
    saved, backend.encode_special_tokens = backend.encode_special_tokens, True
    try:
        return backend.encode_batch(texts, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = saved


def supervised(encoding, spans: list[tuple[int, int]]) -> list[int]:
    """Labels of one text chunk's tokens: the id where a token's characters overlap a supervised span, else -100.
    Token offsets rise along the text, so the tokens of a span [a, b) are a run from the first token covering
    character a to the last covering b - 1 (byte-fallback tokens of one character share its offsets): two lookups in
    the Rust encoding instead of reading every token's offsets, a third of the time of tokenizing a row."""
    ids = encoding.ids
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        first, last = encoding.char_to_token(a), encoding.char_to_token(b - 1)
        if first is None or last is None:  # an end character no token covers: check every token
            return supervised_by_offsets(ids, encoding.offsets, spans)
        while last + 1 < len(ids) and encoding.token_to_chars(last + 1)[0] < b:
            last += 1
        labels[first : last + 1] = ids[first : last + 1]
    return labels


def supervised_by_offsets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """The definition, token by token: supervised when a token's characters overlap a span (a token of none, never)."""
    return [t if e > s and any(s < b and e > a for a, b in spans) else IGNORE_INDEX for t, (s, e) in zip(ids, offsets)]
