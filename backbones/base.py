"""The backbone contract (LLMBackbone) and its Hugging Face implementation (HFCausalLLMBackbone).

The rest of shardtune reads only the contract: FSDP wraps `transformer_layer_cls`, the last-layer recipe trains
`last_layer_finetune_modules`, the data pipeline formats with `prompt_builder_fn`. Nothing here knows about ranks.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType

import torch
from tokenizers import normalizers, pre_tokenizers
from torch import nn
from torch.distributions import constraints
from torch.distributions.multivariate_normal import MultivariateNormal
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from backbones.attention import TORCH_VARLEN  # noqa: F401  (registers the torch_varlen attention implementation)
from backbones.hub import hub_unreachable, offline_advice
from backbones.lora import init_adapter, is_adapter, pretrained_name
from backbones.loss import causal_lm_last_token_logits, causal_lm_loss_sum
from backbones.prompting import ESCAPE, PromptBuilder
from backbones.weights import SafetensorsReader, WeightsError


@dataclass(frozen=True)
class BackboneSpec:
    """One registry row: everything shardtune knows about a backbone id before loading anything."""

    cls: type[HFCausalLLMBackbone]
    hf_hub_path: str
    prompt_builder: type[PromptBuilder]
    llm_max_length: int  # the context the model was trained at; --data.max_length may not exceed it
    config: dict = field(default_factory=dict)  # published config.json shape values (offline meta builds, plans)
    # Built by shardtune itself (no network): a function that gives its local directory (backbones.tiny).
    local_build: Callable[[], Path] | None = None
    # Tokens the family adds to the tokenizer, each a new embedding row (LLaMA-2's <PAD>); the planner counts them.
    added_tokens: int = 0


class LLMBackbone(nn.Module, ABC):
    """What a language-model family must tell the launcher: the class attributes and `last_layer_modules` below are
    read from the class alone, so the planner can use them for a model it builds on `meta` from published shapes."""

    transformer_layer_cls: type[nn.Module]  # the decoder block: FSDP2's unit and activation checkpointing's
    half_precision_dtype: torch.dtype = torch.bfloat16
    linear_layer_names: tuple[str, ...] = ()  # the linear layers of a decoder block, by name: LoRA's default targets
    end_of_turn_token: str | None = None  # what ends an answer when it is not the tokenizer's EOS (`<|eot_id|>`)

    def __init__(self, identifier: str) -> None:
        super().__init__()
        self.identifier = identifier
        self.llm: PreTrainedModel
        self.tokenizer: PreTrainedTokenizerBase

    @property
    @abstractmethod
    def prompt_builder_fn(self) -> Callable[[str], PromptBuilder]: ...

    @classmethod
    @abstractmethod
    def last_layer_modules(cls, llm: PreTrainedModel) -> Sequence[nn.Module]:
        """What the last-layer stage trains in `llm`; with tied embeddings the head is the embedding, trained once."""

    @property
    def last_layer_finetune_modules(self) -> Sequence[nn.Module]:
        return self.last_layer_modules(self.llm)

    @property
    def tied_embeddings(self) -> bool:
        return self.llm.get_output_embeddings().weight is self.llm.get_input_embeddings().weight

    @property
    def embed_dim(self) -> int:
        return self.llm.config.hidden_size

    def forward(self, *args, **kwargs):
        return self.llm(*args, **kwargs)


def padded_vocab_size(num_tokens: int, vocab_size: int, multiple: int) -> int:
    """The one place the embedding size is decided: unchanged when the tokenizer fits, else the tokenizer's size
    rounded up to `multiple`."""
    return vocab_size if num_tokens <= vocab_size else -(-num_tokens // multiple) * multiple


@torch.no_grad()
def grow_vocab_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows for new tokens as transformers' `resize_token_embeddings` (mean_resizing=True) makes them: samples of
    a normal with the old rows' mean and 1e-9 x their covariance (https://nlp.stanford.edu/~johnhew/vocab-expansion.html),
    or the mean where that covariance is not positive definite."""
    added = rows - weight.shape[0]
    mean = weight.mean(0)
    centered = weight - mean
    covariance = 1e-9 * (centered.T @ centered) / weight.shape[0]
    if constraints.positive_definite.check(covariance).all():
        new = MultivariateNormal(mean, covariance_matrix=covariance).sample((added,))
    else:
        new = mean[None].repeat(added, 1)
    return torch.cat([weight, new.to(weight.dtype)])


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """The one tokenizer pipeline of training and of the export, in place:
    - the chat template's escape separator (prompting.ESCAPE) is deleted before tokenizing;
    - a sentencepiece tokenizer (a Metaspace pre-tokenizer, as transformers 5 rebuilds LLaMA's) gets sentencepiece's
      own rule back, the one its tokenizer.json has: a dummy-prefix space before every text between special tokens,
      even one that starts with a space. Metaspace adds it only to the first text and only when it does not start
      with a space, so `  hi` gave `▁` `▁hi` where Meta's sentencepiece gives `▁▁` `▁hi`, and in one rendered string
      `<s>[INST]` gave `<s>` `[` where Meta's per-turn encoding gives `<s>` `▁[`."""
    backend = tokenizer.backend_tokenizer
    if ESCAPE in str(backend.normalizer):
        return
    steps = [normalizers.Replace(ESCAPE, "")]
    if isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace):
        replacement = backend.pre_tokenizer.replacement
        steps += [normalizers.Prepend(replacement), normalizers.Replace(" ", replacement)]
        backend.pre_tokenizer = None
    if backend.normalizer is not None:
        steps.append(backend.normalizer)
    backend.normalizer = normalizers.Sequence(steps)


def save_chat_tokenizer(tokenizer: PreTrainedTokenizerBase, builder: type[PromptBuilder], directory: Path) -> None:
    """Save `tokenizer` with the family's chat template, so that `apply_chat_template(tokenize=True)` on the saved
    directory gives the ids training gives the same conversation. Saved as the generic fast tokenizer class: a
    family class (LlamaTokenizer) rebuilds its pipeline from the vocabulary when transformers 5 loads it and would drop
    the escape separator's deletion; the generic class loads tokenizer.json exactly as written."""
    added = list(tokenizer.added_tokens_decoder.values())
    tokenizer.chat_template = builder.template_for([t.content for t in added if t.special],
                                                   [t.content for t in added if not t.special])  # fmt: skip
    tokenizer.save_pretrained(directory)
    config_file = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def read_hf_token(token_file: str | None = None) -> str | None:
    """The Hub token from `HF_TOKEN`, else from a token file; never logged or saved by shardtune."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"].strip()
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"--model.hf_token_file={token_file} does not exist; give a file holding a Hub token"
            )
        return path.read_text().strip()
    return None


class HFCausalLLMBackbone(LLMBackbone):
    """A causal LM from a Hub id or a local directory: tokenizer and config through `from_pretrained`, the module tree
    built once on `meta`. Weights are read one tensor at a time (`pretrained_weights`) into whatever the caller
    allocated: the sharded model on every rank, or, with `load_weights`, this whole model on the CPU."""

    def __init__(
        self,
        identifier: str,
        spec: BackboneSpec,
        hf_token_file: str | None = None,
        inference_mode: bool = False,
        attn_implementation: str = "sdpa",
        local_path: str | None = None,
        load_weights: bool = True,
    ) -> None:
        super().__init__(identifier)
        self.spec = spec
        self.hf_hub_path = local_path or spec.hf_hub_path
        self.is_local = local_path is not None
        self.hf_token_file = hf_token_file  # a path; the token itself is read per call and kept nowhere
        self.llm_max_length = spec.llm_max_length
        self.inference_mode = inference_mode
        self.tokenizer = self._load(
            AutoTokenizer.from_pretrained, model_max_length=self.llm_max_length, padding_side="right"
        )
        self.extend_tokenizer()
        prepare_tokenizer(self.tokenizer)
        config = self._load(AutoConfig.from_pretrained)
        config.vocab_size = padded_vocab_size(len(self.tokenizer), config.vocab_size, self.pad_vocab_to)
        with torch.device("meta"):
            self.llm = AutoModelForCausalLM.from_config(
                config, attn_implementation=attn_implementation, dtype=torch.float32
            )
        self.llm.generation_config = self._generation_config(config)
        # The loss with the head in chunks (no full fp32 logits); fsdp registers it as a forward method.
        self.llm.chunked_loss_sum = MethodType(causal_lm_loss_sum, self.llm)
        self.llm.last_token_logits = MethodType(causal_lm_last_token_logits, self.llm)  # greedy evals in the loop
        self.llm.config.pad_token_id = self.tokenizer.pad_token_id
        self.llm.config.use_cache = inference_mode
        if not inference_mode:
            self.llm.train()
        if load_weights:  # one process, no sharding: allocate here and read the weights in
            self.llm.to_empty(device="cpu")
            self.llm.tie_weights()  # to_empty gives each module its own new tensor, a tied head included
            self.init_non_persistent_buffers()
            weights = self.pretrained_weights()
            with torch.no_grad():
                for name, tensor in self.llm.state_dict().items():
                    tensor.copy_(weights(name))

    @property
    def prompt_builder_fn(self) -> Callable[[str], PromptBuilder]:
        return self.spec.prompt_builder

    # Tensor-core friendly vocabulary size after new tokens are added (Karpathy: "pad to a multiple of 64").
    pad_vocab_to = 64

    def extend_tokenizer(self) -> None:
        """Add family-specific special tokens; the embeddings are resized to match."""

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Recompute buffers that no state dict carries (rotary `inv_freq`) after materialising from `meta`:
        `to_empty` leaves them as uninitialised memory."""
        for module in self.llm.modules():
            if module._non_persistent_buffers_set:
                self.llm._init_weights(module)

    def pretrained_weights(self) -> Callable[[str], torch.Tensor]:
        """`read(name)`: one pretrained tensor as this model holds it (fp32, vocabulary rows grown for new tokens), read
        from the safetensors files without mapping them, so only one tensor is in memory at a time."""
        reader = SafetensorsReader(self._weights_directory())
        shapes = {name: tensor.shape for name, tensor in self.llm.state_dict().items()}
        tied = bool(getattr(self.llm.config, "tie_word_embeddings", False))

        def read(name: str) -> torch.Tensor:
            if is_adapter(name):  # a LoRA matrix: peft's initialisation (rank 0 draws it; every rank gets it)
                return init_adapter(name, shapes[name])
            name, wanted = pretrained_name(name), name
            if name not in reader.entries and tied and name == "lm_head.weight":
                name = "model.embed_tokens.weight"
            if name not in reader.entries:
                raise WeightsError(
                    f"{self.hf_hub_path}: the weights have no tensor '{name}'; is this a "
                    f"{type(self.llm).__name__} checkpoint?"
                )
            tensor, shape = reader.read(name).to(torch.float32), shapes[wanted]
            if tensor.shape != shape and tensor.shape[1:] == shape[1:] and tensor.shape[0] < shape[0]:
                tensor = grow_vocab_rows(tensor, shape[0])
            if tensor.shape != shape:
                raise WeightsError(
                    f"{self.hf_hub_path}: '{name}' has shape {tuple(tensor.shape)}, the model expects {tuple(shape)}"
                )
            return tensor

        return read

    def check_weights(self) -> None:
        """Read the headers of a local directory's safetensors files: a truncated or malformed file is refused by name
        before anything starts (Hub weights are checked when rank 0 downloads them)."""
        if self.is_local:
            SafetensorsReader(self._weights_directory())

    def _weights_directory(self) -> Path:
        if self.is_local:
            return Path(self.hf_hub_path)
        from huggingface_hub import snapshot_download

        return Path(
            self._load(
                lambda repo, **kw: snapshot_download(repo, **kw),
                allow_patterns=["*.safetensors", "*.safetensors.index.json"],
            )
        )

    def _generation_config(self, config) -> GenerationConfig:
        try:
            return self._load(GenerationConfig.from_pretrained)
        except OSError:  # a directory without generation_config.json
            return GenerationConfig.from_model_config(config)

    def _load(self, loader: Callable, **kwargs):
        if not self.is_local and hub_unreachable():
            try:  # the Hub cache may hold it already
                return loader(self.hf_hub_path, local_files_only=True, **kwargs)
            except (OSError, ValueError):
                raise OSError(offline_advice(f"'{self.hf_hub_path}' (backbone '{self.identifier}')")) from None
        token = None if self.is_local else read_hf_token(self.hf_token_file)
        try:
            return loader(self.hf_hub_path, token=token, **kwargs)
        except OSError as error:
            raise OSError(
                f"could not load '{self.hf_hub_path}' for backbone '{self.identifier}': {error}\n"
                "If it is a gated Hub model, accept its licence on the Hub and supply a token with the HF_TOKEN "
                "variable or --model.hf_token_file; without network, point --model.path at a local directory "
                "holding the model (config.json, *.safetensors, tokenizer files)."
            ) from None
