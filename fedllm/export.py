"""`fedllm export RUN_DIR OUT`: a run's adapter as a portable PEFT folder, or merged into its base.

The global adapter by default; `--best` for the best round's (`output.best_by`); `--round K` for
round K's (a snapshot, `output.snapshot_every`, or the best or final round's); `--client N`
for client N's own personal adapter if it kept one (`clients/N/personal_adapter`), else the
server's copy of its last update (`client_adapters/N`). Clients may train at different ranks:
every saved adapter is one PEFT folder at one rank (lower ranks zero-padded), so each exports
alike. `--merge` writes a plain Hugging Face model folder (weights W + s·B·A, the base's tokenizer
and generation config, a model card) that `AutoModelForCausalLM.from_pretrained(OUT)` loads.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from fedllm.files import building_folder, load_json_object, write_atomic
from fedllm.model.adapters import ADAPTER_CONFIG, RECOPY, adapter_summary, check_adapter_files
from fedllm.model.card import (
    BEST_ADAPTER,
    CARD_JSON,
    README,
    AdapterCard,
    make_card,
    read_card,
    render_card,
    resolve_adapter_base,
    write_card,
)
from fedllm.model.identity import base_identity
from fedllm.model.loading import DTYPES
from fedllm.recipe import RunConfig, load_recipe

PERSONAL = Path("clients") / "{client}" / "personal_adapter"
CLIENT = Path("client_adapters") / "{client}"
SNAPSHOT = Path("snapshots") / "round_{round}"


def run_recipe(run_dir: Path) -> RunConfig:
    """The resolved recipe a run left in its folder."""
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no recipe.yaml, needed for an adapter without a card"
        )
    return load_recipe(recipe)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a folder that is no fedllm run (neither its recipe nor its final adapter)."""
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir} does not exist; pass the folder `fedllm run` wrote")
    if not (run_dir / "recipe.yaml").is_file() and not (run_dir / "final_adapter").is_dir():
        raise FileNotFoundError(
            f"{run_dir} is not a fedllm run folder (no recipe.yaml, no final_adapter/); pass the "
            "folder `fedllm run` wrote, e.g. runs/quickstart"
        )


def find_adapter(
    run_dir: Path, *, client: int | None = None, round: int | None = None, best: bool = False
) -> Path:
    """The adapter folder to export: global, the best round's, a snapshot, or one client's."""
    if sum((client is not None, round is not None, best)) > 1:
        raise ValueError("pass one of --client, --round and --best (or none: the final adapter)")
    if best:
        folder = run_dir / BEST_ADAPTER
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"{run_dir}: no {BEST_ADAPTER}/ (the run kept none: output.best_by is none, or "
                "no round has finished); leave out --best for the final adapter"
            )
        return folder
    if client is not None:
        for pattern in (PERSONAL, CLIENT):
            folder = run_dir / str(pattern).format(client=client)
            if (folder / "adapter_config.json").is_file():
                return folder
        have = sorted(
            {p.parent.name for p in run_dir.glob("clients/*/personal_adapter/adapter_config.json")}
            | {p.parent.name for p in run_dir.glob("client_adapters/*/adapter_config.json")}
        )
        raise FileNotFoundError(
            f"{run_dir}: no adapter of client {client} (neither "
            f"{str(PERSONAL).format(client=client)} nor {str(CLIENT).format(client=client)}); "
            f"valid --client: {', '.join(have) or 'none (a private run keeps none)'}"
        )
    if round is not None:
        folder = run_dir / str(SNAPSHOT).format(round=round)
        if (folder / "adapter_config.json").is_file():
            return folder
        final = (read_card(run_dir / "final_adapter") or {}).get("round")
        if round == final:
            return run_dir / "final_adapter"  # the last round's adapter is the final one
        kept = (read_card(run_dir / BEST_ADAPTER) or {}).get("round")
        if round == kept:
            return run_dir / BEST_ADAPTER
        have = sorted(
            int(p.parent.name.removeprefix("round_"))
            for p in run_dir.glob("snapshots/round_*/adapter_config.json")
        )
        last = f"; the final adapter is round {final} (leave out --round)" if final else ""
        last += f"; best_adapter/ is round {kept} (--best)" if kept else ""
        raise FileNotFoundError(
            f"{run_dir}: no snapshot of round {round}; snapshots: "
            f"{', '.join(map(str, have)) or 'none (set output.snapshot_every)'}{last}"
        )
    folder = run_dir / "final_adapter"
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no adapter: did the run finish?")
    return folder


def adapter_card(adapter: Path, run_dir: Path) -> AdapterCard:
    """The adapter's card (which holds the run's recipe); an adapter from before cards gets one
    from the run's recipe.yaml."""
    data = read_card(adapter)
    if data is not None:
        return AdapterCard.from_json(data)
    cfg = run_recipe(run_dir)
    saved = adapter_summary(adapter)
    card = make_card(cfg, base_identity(cfg), what="global", round=0, rank=int(saved["r"]))
    return replace(card, alpha=float(saved["lora_alpha"]))


def _fresh(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; pick a new OUT")


@contextmanager
def _building(out: Path) -> Iterator[Path]:
    """A folder beside `out` to build the export in, renamed to `out` when the block ends: an
    interrupted export leaves no half folder at OUT (one that loads without its card)."""
    _fresh(out)
    with building_folder(out) as tmp:
        yield tmp


def export_adapter(adapter: Path, out: Path, *, card: AdapterCard, base_name: str | None) -> Path:
    """Copy the adapter's own files (not a folder an eval wrote into it: its report lists
    training example ids) with its card; `base_name` re-points `base_model_name_or_path`."""
    if base_name is not None:
        card = replace(card, base=replace(card.base, name=base_name))
    with _building(out) as tmp:
        for f in adapter.iterdir():
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)  # an ordinary file's mode, not the source's
        config = load_json_object(adapter / ADAPTER_CONFIG, remedy=RECOPY)  # names the source
        config["base_model_name_or_path"] = card.base.name  # portable even for an old adapter
        write_atomic(tmp / ADAPTER_CONFIG, json.dumps(config, indent=2))
        write_atomic(tmp / CARD_JSON, json.dumps(card.to_json(), indent=2))
        write_atomic(tmp / README, render_card(card))
    return out


def export_merged(
    adapter: Path, out: Path, *, card: AdapterCard, dtype: str, quantized: bool
) -> Path:
    """Merge the adapter into its (full-precision) base; save model, tokenizer and card."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _fresh(out)  # before the base is loaded
    base_dir = resolve_adapter_base(adapter)
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged = merged.to(DTYPES[dtype])
    note = "Merged in float32" + (f", saved as {dtype}" if dtype != "float32" else "") + "."
    if quantized:
        note += " The run trained on a quantized base; this is merged into the full-precision one."
    with _building(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_card(tmp, replace(card, what="merged", note=f"{card.note} {note}".strip()))
    return out


def export(
    run_dir: Path,
    out: Path,
    *,
    merge: bool = False,
    client: int | None = None,
    round: int | None = None,
    best: bool = False,
    base_name: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Export a run's adapter (or the merged model) to `out`; returns `out`."""
    check_run_dir(run_dir)
    adapter = find_adapter(run_dir, client=client, round=round, best=best)
    check_adapter_files(adapter)  # a damaged copy is refused, not exported as a success
    card = adapter_card(adapter, run_dir)
    model = card.recipe["model"]
    if not merge:
        if dtype is not None:
            raise ValueError("--dtype applies to --merge only (an adapter stays float32)")
        return export_adapter(adapter, out, card=card, base_name=base_name)
    if base_name is not None:
        raise ValueError("--base-name applies to an adapter export; a merged model has no base")
    dtype = dtype or model["dtype"]
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return export_merged(
        adapter, out, card=card, dtype=dtype, quantized=model["quantization"] != "none"
    )
