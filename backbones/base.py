"""The backbone contract (LLMBackbone) and its Hugging Face implementation (HFCausalLLMBackbone).

The rest of shardtune reads only the contract: FSDP wraps `transformer_layer_cls`, the last-layer recipe trains
`last_layer_finetune_modules`, the data pipeline formats with `prompt_builder_fn`. Nothing here knows about ranks.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from backbones.attention import TORCH_VARLEN  # noqa: F401  (registers the torch_varlen attention implementation)
from backbones.prompting import PromptBuilder


@dataclass(frozen=True)
class BackboneSpec:
    """One registry row: everything shardtune knows about a backbone id before loading anything."""

    cls: type[HFCausalLLMBackbone]
    hf_hub_path: str
    prompt_builder: type[PromptBuilder]
    llm_max_length: int  # the context the model was trained at; --data.max_length may not exceed it
    config: dict = field(default_factory=dict)  # published config.json shape values (offline meta builds, plans)
    # Built by shardtune itself (no network): `backbones.tiny.ensure_tiny_model` gives its local directory.
    local_build: bool = False


class LLMBackbone(nn.Module, ABC):
    """What a language-model family must tell the launcher."""

    def __init__(self, identifier: str) -> None:
        super().__init__()
        self.identifier = identifier
        self.llm: PreTrainedModel
        self.tokenizer: PreTrainedTokenizerBase

    @property
    @abstractmethod
    def prompt_builder_fn(self) -> Callable[[str], PromptBuilder]: ...

    @property
    @abstractmethod
    def transformer_layer_cls(self) -> type[nn.Module]: ...

    @property
    @abstractmethod
    def half_precision_dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def last_layer_finetune_modules(self) -> Sequence[nn.Module]: ...

    @property
    def embed_dim(self) -> int:
        return self.llm.config.hidden_size

    def forward(self, *args, **kwargs):
        return self.llm(*args, **kwargs)


def read_hf_token(token_file: str | None = None) -> str | None:
    """The Hub token from `HF_TOKEN`, else from a token file; never logged or saved by shardtune."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"].strip()
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--model.hf_token_file={token_file} does not exist; give a file holding a Hub token")
        return path.read_text().strip()
    return None


class HFCausalLLMBackbone(LLMBackbone):
    """Loads a causal LM and its tokenizer through `from_pretrained`, from a Hub id or a local directory."""

    def __init__(
        self,
        identifier: str,
        spec: BackboneSpec,
        hf_token: str | None = None,
        inference_mode: bool = False,
        attn_implementation: str = "sdpa",
        local_path: str | None = None,
        load_weights: bool = True,
    ) -> None:
        super().__init__(identifier)
        self.spec = spec
        self.hf_hub_path = local_path or spec.hf_hub_path
        self.llm_max_length = spec.llm_max_length
        self.inference_mode = inference_mode
        # The token is used for these calls only and kept nowhere on the object.
        self.tokenizer = self._load(AutoTokenizer.from_pretrained, model_max_length=self.llm_max_length,
                                    padding_side="right", token=hf_token)
        self.extend_tokenizer()
        if load_weights:
            self.llm = self._load(AutoModelForCausalLM.from_pretrained, attn_implementation=attn_implementation,
                                  dtype=torch.float32, token=hf_token)
            if len(self.tokenizer) > self.llm.config.vocab_size:
                self.llm.resize_token_embeddings(len(self.tokenizer), pad_to_multiple_of=self.pad_vocab_to)
        else:  # every parameter on `meta`: the caller shards first, then materialises and loads.
            config = self._load(AutoConfig.from_pretrained, token=hf_token)
            if len(self.tokenizer) > config.vocab_size:
                config.vocab_size = -(-len(self.tokenizer) // self.pad_vocab_to) * self.pad_vocab_to
            with torch.device("meta"):
                self.llm = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                            dtype=torch.float32)
        self.llm.config.pad_token_id = self.tokenizer.pad_token_id
        self.llm.config.use_cache = inference_mode
        if not inference_mode:
            self.llm.train()

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

    def _load(self, loader: Callable, **kwargs):
        try:
            return loader(self.hf_hub_path, **kwargs)
        except OSError as error:
            raise OSError(
                f"could not load '{self.hf_hub_path}' for backbone '{self.identifier}': {error}\n"
                "If it is a gated Hub model, accept its licence on the Hub and supply a token with the HF_TOKEN "
                "variable or --model.hf_token_file; without network, point --model.path at a local directory "
                "holding the model (config.json, *.safetensors, tokenizer files)."
            ) from None
