"""A tiny, randomly initialised LLaMA-2 with a real LLaMA-style tokenizer, built offline and deterministically.

`python -m backbones.tiny` (or `make tiny`) writes an ordinary Hugging Face directory (config, safetensors, tokenizer)
into the cache; the backbone then loads it through the same `from_pretrained` path as the 7B models.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from backbones.tiny_corpus import corpus_lines

# Bump when the recipe below changes, so stale caches are never reused.
# v2: the tokenizer's pipeline is sentencepiece's (a dummy-prefix space before every text), as LLaMA-2's tokenizer.json
TINY_VERSION = "v2"
TINY_VOCAB = 1024
TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.02,
)


def cache_root() -> Path:
    return Path(os.environ.get("SHARDTUNE_HOME", Path.home() / ".cache" / "shardtune")).expanduser()


def build_tiny_tokenizer() -> LlamaTokenizer:
    """BPE with byte fallback and sentencepiece's `▁` word boundaries, like LLaMA-2's own tokenizer: trained on
    words split at `▁`, then given LLaMA-2's tokenizer.json pipeline (a `▁` prepended to every text, spaces as `▁`,
    no pre-tokenizer: no merge crosses a word boundary, so the encodings are the same words' encodings)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    return LlamaTokenizer(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
    )


def build_tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **TINY_CONFIG))


def save_tiny(out_dir: Path, seed: int = 0) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_built(name: str, save: Callable[[Path], None], root: Path | None = None) -> Path:
    """A model directory that shardtune builds itself (`save(directory)` writes it), built on first use into the
    cache. Written under a temporary name and renamed, so concurrent builders (several ranks) and interrupted builds
    never leave a half-written directory."""
    target = (root or cache_root()) / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    try:
        save(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny_model(root: Path | None = None) -> Path:
    """The tiny LLaMA-2's directory."""
    return ensure_built(f"llama2-tiny-{TINY_VERSION}", save_tiny, root)


if __name__ == "__main__":
    print(ensure_tiny_model())
