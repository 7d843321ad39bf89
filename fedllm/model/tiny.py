"""Tiny test models: a small random Llama with a byte-level BPE tokenizer trained on the run's
own texts, built from config and reused when the settings match (no download, seconds to build)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedllm.files import atomic_folder, read_json
from fedllm.model.loading import FORMAT_VERSION

TINY_MARKER = "fedllm_tiny.json"  # written last: its presence means the folder is complete

# Same ids and names as SmolLM2, so tiny test models exercise the same code paths.
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
    **token_ids: int | None,
) -> LlamaConfig:
    """The tiny base's architecture (`model.tiny`'s settings); `token_ids` (bos/eos/pad) come
    from its tokenizer, which `fedllm validate` does not train to check layer names."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        **token_ids,
    )


def build_tiny_model(
    folder: Path,
    *,
    texts: Sequence[str],
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Path:
    """Build (or reuse) a small random Llama with a BPE tokenizer trained on ``texts``.

    Deterministic for given texts and settings; a folder built with the same settings is reused.
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}, "
            f"which must be a multiple of num_kv_heads={num_kv_heads}"
        )
    min_vocab = 256 + len(TINY_SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is below the byte alphabet + specials ({min_vocab})"
        )
    folder = Path(folder)
    settings = {
        "format": FORMAT_VERSION,
        "texts_sha256": hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest(),
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
    }

    def is_current(path: Path) -> bool:
        return read_json(path / TINY_MARKER) == settings

    if is_current(folder):
        return folder
    if folder.exists() and any(folder.iterdir()) and not (folder / TINY_MARKER).is_file():
        raise FileExistsError(
            f"{folder} is not empty and not a fedllm tiny model; pick a new folder"
        )

    tokenizer = _train_tokenizer(texts, vocab_size=vocab_size, max_length=max_position_embeddings)
    config = tiny_config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with atomic_folder(folder, is_complete=is_current) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TINY_MARKER).write_text(json.dumps(settings, indent=2))
    return folder


def _train_tokenizer(
    texts: Sequence[str], *, vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts`` with SmolLM2's special tokens and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    unk, bos, eos, pad = TINY_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=CHATML_TEMPLATE,
        model_max_length=max_length,
    )
