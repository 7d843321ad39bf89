"""Model cards for every adapter folder fedllm writes.

`adapter_config.json` names the base by a portable identity, the recipe's `model.name`
('smollm2-135m', 'tiny', a hub id, or the folder the recipe gave), never a cache path. Next to it,
`fedllm_adapter.json` holds that identity with content hashes (`fedllm.model.identity`), and what
the adapter is (run, round, recipe fingerprint, metrics, fedllm version); `README.md` says the
same as a Hugging Face model card. `resolve_adapter_base` turns the identity back into a local
folder for fedllm's own loaders; stock `PeftModel.from_pretrained(base, folder)` never reads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from fedllm.aggregators import Factors
from fedllm.files import building_folder, load_json_object, write_atomic
from fedllm.model.adapters import RECOPY, adapter_summary, save_peft_adapter
from fedllm.model.identity import BaseIdentity, file_sha256, weight_files
from fedllm.model.loading import resolve_model_dir
from fedllm.model.tiny import TINY_MARKER
from fedllm.recipe.schema import RunConfig
from fedllm.server.metrics import table_markdown

CARD_JSON = "fedllm_adapter.json"
README = "README.md"
TINY_DIR = "tiny_base"  # where a tiny base lives in its run folder (fedllm.model.base)


def resolve_adapter_base(adapter: Path) -> Path:
    """The local base folder of an adapter fedllm wrote (or any PEFT adapter naming a folder).

    Order: `base_model_name_or_path` as an existing folder; a tiny base in the adapter's run
    folder (matched by hash); the embedded model, or a hub id from the offline cache.
    """
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    name = load_json_object(config_path, remedy=RECOPY).get("base_model_name_or_path")
    if not name:
        raise FileNotFoundError(f"{config_path} names no base (base_model_name_or_path)")
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    card = read_card(adapter)
    base = BaseIdentity.from_json(card["base"]) if card and "base" in card else None
    if base is not None and base.kind == "tiny":
        for parent in [adapter, *adapter.resolve().parents][:5]:
            candidate = parent / TINY_DIR
            if (candidate / TINY_MARKER).is_file() and _same_weights(candidate, base):
                return candidate
        raise FileNotFoundError(
            f"{adapter} was trained on the tiny base of its run (sha256 {base.sha256[:12]}), and "
            f"no {TINY_DIR}/ with those weights is in a folder above it; load that base yourself "
            "and use PeftModel.from_pretrained(base, adapter)"
        )
    try:
        return resolve_model_dir(name)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise FileNotFoundError(
            f"{config_path}: base {name!r} is not available here ({err}); set "
            "base_model_name_or_path to your copy of the base (see the adapter's README.md)"
        ) from err


def _same_weights(folder: Path, base: BaseIdentity) -> bool:
    files = weight_files(folder)
    return {p.name for p in files} == set(base.files) and all(
        file_sha256(p) == base.files[p.name] for p in files
    )


def fedllm_version() -> str:
    """The installed fedllm's version ('unknown' when it is not installed as a package)."""
    try:
        return version("fedllm")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class AdapterCard:
    """What one adapter folder is: which base, which run and round, how good, made by what."""

    what: str  # global | client | snapshot | best | personal | tuned | merged
    run: str
    base: BaseIdentity
    round: int  # the round this adapter is from
    rounds: int  # the rounds the recipe asked for
    fingerprint: str  # RunConfig.fingerprint(): model, lora, data, seed, privacy
    recipe: dict[str, Any]  # the resolved recipe (output_dir left out)
    rank: int
    metrics: dict[str, float] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)  # base vs federated, per client
    partition: int | None = None
    note: str = ""
    selected_by: str | None = None  # best_adapter/: the metric its round is the lowest of
    # the adapter's own lora_alpha (scaling × rank: an aggregated global, e.g. svd's at its
    # numerical rank up to Σrᵢ, has scaling 1, not the recipe's α / r); None: the recipe's α
    # (a card from before it, a merged model)
    alpha: float | None = None
    fedllm_version: str = field(default_factory=fedllm_version)

    def to_json(self) -> dict[str, Any]:
        """The card as JSON data (`from_json` reads it back), with the base's combined `sha256`."""
        data = asdict(self)
        data["base"] = {**asdict(self.base), "sha256": self.base.sha256}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterCard:
        """The card `to_json` wrote (unknown keys from newer fedllm versions are ignored)."""
        names = {f.name for f in fields(cls)} - {"base"}
        kept = {k: v for k, v in data.items() if k in names}
        return cls(base=BaseIdentity.from_json(data["base"]), **kept)


def make_card(
    cfg: RunConfig,
    base: BaseIdentity,
    *,
    what: str,
    round: int,
    rank: int,
    metrics: dict[str, float] | None = None,
    table: list[dict[str, Any]] | None = None,
    partition: int | None = None,
    note: str = "",
) -> AdapterCard:
    """A card for an adapter of this recipe's run."""
    recipe = cfg.model_dump(mode="json", exclude={"output_dir"})
    return AdapterCard(
        what=what,
        run=cfg.name,
        base=base,
        round=round,
        rounds=cfg.federation.rounds,
        fingerprint=cfg.fingerprint(),
        recipe=recipe,
        rank=rank,
        metrics=dict(metrics or {}),
        table=list(table or []),
        partition=partition,
        note=note,
    )


def write_card(folder: Path, card: AdapterCard) -> Path:
    """Write `fedllm_adapter.json` and `README.md` into an adapter (or merged model) folder."""
    write_atomic(folder / CARD_JSON, json.dumps(card.to_json(), indent=2))
    write_atomic(folder / README, render_card(card))
    return folder / README


def save_adapter(
    folder: Path,
    factors: Mapping[str, Factors],
    *,
    card: AdapterCard,
    target_modules: list[str],
    dropout: float = 0.0,
) -> Path:
    """A PEFT adapter folder naming its base portably, with its card; written next to `folder`
    and renamed into place, so a reader (or a crash) never sees half an adapter."""
    with building_folder(folder) as tmp:
        save_peft_adapter(
            tmp, factors, base_model=card.base.name, target_modules=target_modules, dropout=dropout
        )
        saved = adapter_summary(tmp)
        write_card(tmp, replace(card, rank=int(saved["r"]), alpha=float(saved["lora_alpha"])))
    return folder


def read_card(folder: Path) -> dict[str, Any] | None:
    """The card data of a folder fedllm wrote (None for other folders); a damaged card (empty
    or cut short, e.g. by an interrupted copy) is a ValueError naming its file."""
    path = folder / CARD_JSON
    return load_json_object(path, remedy=RECOPY) if path.is_file() else None


BEST_ADAPTER = "best_adapter"  # a run's folder for its best round's global adapter (output.best_by)
TITLES = {
    "global": "global adapter",
    "client": "one client's update, as the server received it",
    "snapshot": "global adapter snapshot",
    "best": "global adapter of the best round",
    "personal": "personal adapter, kept on its client",
    "tuned": "final global adapter tuned on one client's data, kept on that client",
    "merged": "merged model (base + federated LoRA adapter)",
}


def render_card(card: AdapterCard) -> str:
    """The card as a Hugging Face model card: YAML metadata, then Markdown."""
    merged = card.what == "merged"
    meta: dict[str, Any] = {"library_name": "transformers" if merged else "peft"}
    if card.base.upstream:
        meta["base_model"] = card.base.upstream
    meta["tags"] = ["fedllm", "lora", "federated-learning"]
    who = f" (client {card.partition})" if card.partition is not None else ""
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {card.run}: {TITLES.get(card.what, card.what)}{who}",
        "",
        f"Federated LoRA fine-tuning with fedllm {card.fedllm_version}: aggregator "
        f"`{card.recipe['aggregator']['name']}`, {card.recipe['data']['num_clients']} clients, "
        f"round {card.round} of {card.rounds}. {card.note}".rstrip(),
        "",
        "## Base model",
        "",
        "| | |",
        "|---|---|",
        f"| name (`base_model_name_or_path`) | `{card.base.name}` |",
        f"| kind | {card.base.kind} |",
    ]
    lines += [f"| {k} | {v} |" for k, v in card.base.source.items()]
    if card.base.upstream:
        hub = f"https://huggingface.co/{card.base.upstream}"
        lines.append(f"| derived from | [{card.base.upstream}]({hub}) |")
    lines += [f"| sha256 of `{name}` | `{digest}` |" for name, digest in card.base.files.items()]
    lines += ["", "## Using it", "", *_usage(card), "", "## Training", ""]
    lora = card.recipe["lora"]
    fed = card.recipe["federation"]
    lines += [
        "| | |",
        "|---|---|",
        f"| rounds | {card.rounds} (this {'model' if merged else 'adapter'}: round {card.round}) |",
        f"| LoRA | rank {card.rank}, α {lora['alpha'] if card.alpha is None else card.alpha:g}, "
        f"targets {', '.join(lora['target_modules'])} |",
        f"| local training | {fed['local_steps'] or fed['local_epochs']} "
        f"{'steps' if fed['local_steps'] else 'epochs'} per round, batch {fed['batch_size']}, "
        f"{fed['optimizer']} lr {fed['lr']} |",
        f"| data | `{Path(str(card.recipe['data']['source'])).name}`, "
        f"{card.recipe['data']['partitioner']} partition |",
        f"| privacy | {card.recipe['privacy']['mode']} |",
        f"| recipe fingerprint | `{card.fingerprint}` |",
        f"| fedllm | {card.fedllm_version} |",
    ]
    if card.metrics or card.table:
        lines += ["", "## Results", ""]
        lines += [f"- {k.replace('_', ' ')}: {_fmt(v)}" for k, v in card.metrics.items()]
        if card.table:
            lines += ["", table_markdown(card.table)]
    lines += [
        "",
        "## Recipe",
        "",
        "The resolved recipe of the run (`output_dir` left out):",
        "",
        "```yaml",
        yaml.safe_dump(card.recipe, sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _usage(card: AdapterCard) -> list[str]:
    if card.what == "merged":
        return [
            "A plain Hugging Face model folder (the LoRA update merged into the base weights):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
            "```",
        ]
    return [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        'base = AutoModelForCausalLM.from_pretrained("YOUR_COPY_OF_THE_BASE")',
        'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
        "```",
        "",
        f"`base_model_name_or_path` is `{card.base.name}`, fedllm's name for the base "
        "(fedllm finds it by that name; `PeftModel.from_pretrained` ignores it). For tools that "
        "load the base from it (`AutoPeftModelForCausalLM`), point it at your copy: "
        "`fedllm export RUN_DIR OUT --base-name PATH_OR_HUB_ID`, or edit `adapter_config.json`. "
        "Check your copy against the sha256 above. `fedllm export RUN_DIR OUT --merge` writes a "
        "standalone model instead.",
    ]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
