"""Recipe schema: every shipped recipe validates; bad input is named with what would be valid."""

import sys
from pathlib import Path
from types import ModuleType

import pytest

from fedllm.cli import main
from fedllm.model.base import check_ranks
from fedllm.recipe import ConfigError, build_config, load_recipe, load_yaml, parse_overrides

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
TINY_RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates_and_says_how_to_run_it(path: Path) -> None:
    load_recipe(path)  # a ConfigError names the field if it is not valid
    header = path.read_text().split("\n\n")[0]
    # its own run command, not a neighbour's pasted with the header
    assert f"recipes/{path.name}" in header or "make " in header, "header must give its command"


def test_shipped_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "tiny.yaml"} <= names


def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"lora": {"rnaks": [4]}})
    assert "lora.rnaks" in str(err.value)
    assert "did you mean 'ranks'" in str(err.value)


def test_wrong_type_names_the_key_and_value() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"federation": {"rounds": "three"}})
    assert "federation.rounds" in str(err.value) and "'three'" in str(err.value)


@pytest.mark.parametrize("ranks", [0, -4, [4, 0], []])
def test_nonpositive_or_empty_ranks_are_rejected(ranks) -> None:
    with pytest.raises(ConfigError, match=r"lora\.ranks"):
        build_config({"lora": {"ranks": ranks}})


def test_unknown_aggregator_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"aggregator": {"name": "fedavgg"}})
    assert "aggregator.name" in str(err.value) and "svd" in str(err.value)


def test_missing_local_dataset_and_model_folder_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=r"data\.source.*nope\.jsonl"):
        build_config({"data": {"source": str(missing)}})
    with pytest.raises(ConfigError, match=r"model\.name.*no_model"):
        build_config({"model": {"name": str(tmp_path / "no_model")}})


def test_missing_recipe_file_lists_shipped_recipes(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"not a shipped recipe; shipped recipes: .*quickstart, .*`fedllm recipes`",
    ):
        load_recipe(tmp_path / "absent.yaml")


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="clients_per_round"):
        build_config({"data": {"num_clients": 2}, "federation": {"clients_per_round": 3}})
    with pytest.raises(ConfigError, match="tiers cover 3 clients"):
        build_config(
            {
                "data": {"num_clients": 4},
                "lora": {"tiers": [{"name": "a", "rank": 4, "clients": 3}]},
            }
        )
    with pytest.raises(ConfigError, match=r"local_steps \(5\) and local_epochs \(1\) are both set"):
        build_config({"federation": {"local_steps": 5, "local_epochs": 1.0}})
    with pytest.raises(ConfigError, match=r"set local_steps .* or local_epochs .*both are null"):
        build_config({"federation": {"local_steps": None}})
    # local_epochs alone replaces the steps' default (h110: it was "set exactly one")
    alone = build_config({"federation": {"local_epochs": 0.5}}).federation
    assert (alone.local_steps, alone.local_epochs) == (None, 0.5)


def test_overrides_parse_as_yaml_and_nest() -> None:
    tree = parse_overrides(["federation.rounds=2", "lora.ranks=[4, 8]", "name=x"])
    assert tree == {"federation": {"rounds": 2}, "lora": {"ranks": [4, 8]}, "name": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["federation.rounds"])


@pytest.mark.parametrize(
    "order",
    [
        ["features.fedprox.mu=0.1", "features.fedprox=true"],  # mu was dropped silently (h95)
        ["features.fedprox=true", "features.fedprox.mu=0.1"],  # refused as a conflict before
    ],
)
def test_a_feature_switched_on_and_given_an_option_keeps_it_in_either_order(order) -> None:
    assert parse_overrides(order) == {"features": {"fedprox": {"mu": 0.1}}}
    cfg = load_recipe(str(TINY_RECIPE), order)
    assert dict(cfg.features["fedprox"]) == {"mu": 0.1}


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("data.test_set={fraction: 0.1, labels: [a", "expected ',' or ']'"),
        ("federation.lr=[1,2", "expected ',' or ']'"),
        ("data.test_set={fraction: 0.1", "expected ',' or '}'"),
        ('name="abc', "found unexpected end of stream"),
    ],
)
def test_a_malformed_yaml_override_is_one_line_naming_it(
    override: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_overrides(["federation.rounds=2", override])
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"override {override!r}: the value is not valid YAML ({problem}")
    assert "a list ([4, 8])" in text
    # the command line reports it as one error line with exit 2, no traceback
    tiny = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
    assert main(["validate", str(tiny), override]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"fedllm: error: {text}"]
    assert "Traceback" not in captured.err


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nfederation: {rounds: 5}\n")
    assert load_recipe(recipe, ["federation.rounds=2"]).federation.rounds == 2
    with pytest.raises(ConfigError, match=r"federation\.rounds"):
        load_recipe(recipe, ["federation.rounds=0"])


def test_client_ranks_list_tiers_and_rule() -> None:
    cfg = build_config({"data": {"num_clients": 5}, "lora": {"ranks": [4, 8]}})
    assert [cfg.client_rank(i) for i in range(5)] == [4, 8, 4, 8, 4]
    tiers = [{"name": "phone", "rank": 2, "clients": 3}, {"name": "gpu", "rank": 16, "clients": 2}]
    cfg = build_config({"data": {"num_clients": 5}, "lora": {"ranks": None, "tiers": tiers}})
    assert [cfg.client_rank(i) for i in range(5)] == [2, 2, 2, 16, 16]
    rule = {"min": 4, "max": 32, "spacing": "geometric"}
    cfg = build_config({"data": {"num_clients": 4}, "lora": {"ranks": rule}})
    assert [cfg.client_rank(i) for i in range(4)] == [4, 8, 16, 32]
    assert cfg.client_scaling(8) == pytest.approx(16 / 8)


def test_rank_larger_than_a_module_is_rejected() -> None:
    cfg = build_config({"data": {"num_clients": 2}, "lora": {"ranks": [4, 40]}})
    shapes = {
        "model.layers.0.self_attn.q_proj": (64, 64),
        "model.layers.0.self_attn.v_proj": (32, 64),
    }
    with pytest.raises(ValueError, match=r"lora\.ranks: client 1 has rank 40.*v_proj.*1\.\.32"):
        check_ranks(cfg, shapes)
    check_ranks(build_config({"data": {"num_clients": 2}, "lora": {"ranks": [4, 32]}}), shapes)


def test_fingerprint_tracks_what_clients_must_share() -> None:
    a = build_config({})
    assert a.fingerprint() == build_config({"federation": {"rounds": 9}}).fingerprint()
    assert a.fingerprint() != build_config({"lora": {"alpha": 8}}).fingerprint()


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        (
            "eight",
            r"lora\.ranks: got 'eight'; valid forms: int, list\[int\], \{min, max, spacing\}",
        ),
        (2.5, r"lora\.ranks: got 2\.5; valid forms: int, list\[int\], \{min, max, spacing\}"),
        ({"min": 8, "max": 2}, r"lora\.ranks: min \(8\) must be <= max \(2\)"),
        ({"min": 2, "maxx": 4}, r"lora\.ranks\.maxx: unknown key \(did you mean 'max'\?\); valid"),
    ],
)
def test_a_value_no_form_of_a_union_takes_is_one_plain_error(ranks, message: str) -> None:
    """lora.ranks takes an int, a list or a {min, max, spacing} rule: a bad value gets one line
    (the rule's own for a mapping), not one per form with pydantic's internal names."""
    with pytest.raises(ConfigError, match=message) as caught:
        build_config({"lora": {"ranks": ranks}})
    assert "function-after" not in str(caught.value) and "lora.ranks.int" not in str(caught.value)


@pytest.mark.parametrize("override", ["federation.rounds=true", "federation.lr=false"])
def test_a_boolean_is_no_number(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: expected a number, got a boolean"):
        load_recipe(Path(__file__).parents[1] / "recipes" / "tiny.yaml", [override])
    tiny = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
    load_recipe(tiny, ["federation.share_head=true"])  # a bool field takes one


def _quality_bench() -> ModuleType:
    """bench/quality.py as a module (it imports its bench/_*.py neighbours by name)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        import quality
    finally:
        sys.path.pop(0)
    return quality


def test_a_recipe_header_names_quality_cells_the_bench_has() -> None:
    """A header's `python bench/quality.py ...` command parses: the bench's flags, its method
    labels or groups, its regimes (twelve headers once named a flag it never had)."""
    import shlex

    quality = _quality_bench()
    commands = [
        line.split("python bench/quality.py", 1)[1].rstrip(")")
        for path in RECIPES
        for line in path.read_text().split("\n\n")[0].splitlines()
        if "python bench/quality.py" in line
    ]
    assert len(commands) >= 12
    # a group named like a method would make `--methods squeeze` run every squeeze variant
    assert not set(quality.GROUPS) & set(quality.METHODS)
    for command in commands:
        flag, values = None, {}
        for token in shlex.split(command):
            if token.startswith("--"):
                flag = token
                values[flag] = []
            else:
                values[flag].append(token)
        assert set(values) <= {"--methods", "--regimes", "--seeds"}, command
        assert set(values["--methods"]) <= set(quality.METHODS) | set(quality.GROUPS), command
        assert set(values.get("--regimes", [])) <= set(quality.REGIMES), command


def test_every_quality_cell_is_a_valid_recipe() -> None:
    """Each federated cell of the grid validates before hours of other cells run (a regime
    with a method list runs only those: client-level DP refuses some methods)."""
    quality = _quality_bench()
    for regime, about in quality.REGIMES.items():
        _quality_cells_load(quality, regime, about.methods or list(quality.METHODS))


def test_a_regime_runs_only_its_methods(capsys: pytest.CaptureFixture[str]) -> None:
    quality = _quality_bench()
    cells = quality.plan(["local only", "fedit", "squeeze"], ["clientdp", "domain"], [0, 1])
    assert cells == [
        ("fedit", "clientdp", 0),
        ("squeeze", "clientdp", 0),
        ("local only", "domain", 0),
        ("fedit", "domain", 0),
        ("squeeze", "domain", 0),
        ("fedit", "clientdp", 1),
        ("squeeze", "clientdp", 1),
        ("local only", "domain", 1),
        ("fedit", "domain", 1),
        ("squeeze", "domain", 1),
    ]
    assert "clientdp runs only fedit, squeeze, squeeze balanced; skipped local only" in (
        capsys.readouterr().out
    )


def test_the_plan_is_its_steps_commands_each_cell_once() -> None:
    """`--plan` runs PLAN's cells in order, each once; each step's printed command (what a
    person runs by hand), parsed by the script's own parser, asks for the step's cells."""
    import shlex

    quality = _quality_bench()
    cells = quality.plan_cells(quality.PLAN, quiet=True)
    assert len(cells) == len(set(cells)) == 222  # docs/aggregators.md quotes the count
    # the step that may change the default first (stop 51), then core, seed by seed
    fedplora = [
        (m, "scarce-lr", s)
        for s in (1, 2, 3)
        for m in ("fedplora one-draw", "fedplora client-scaling one-draw")
    ]
    assert cells[:7] == [*fedplora, ("centralised", "scarce", 0)]
    parser = quality.build_parser()
    for step in quality.PLAN:
        args = parser.parse_args(shlex.split(step.command())[2:])
        assert quality.chosen_cells(args) == quality.plan_cells([step], quiet=True), step
    assert quality.chosen_cells(parser.parse_args(["--plan"])) == cells
    # a step that left out its seeds runs the default ones, as the command line does
    assert {s for _, _, s in quality.chosen_cells(parser.parse_args([]))} == set(quality.SEEDS)


def test_a_reference_at_another_lr_is_still_that_reference() -> None:
    quality = _quality_bench()
    assert quality.reference("local only lr 0.01") == "local only"
    assert quality.reference("centralised") == "centralised"
    assert quality.reference("squeeze lr 0.01") is None and quality.reference("fedit") is None
    cfg = load_recipe(
        quality.recipe_path("svd"),
        quality.overrides("local only lr 0.01", regime="scarce", seed=0, extra=[]),
    )
    assert cfg.federation.lr == 0.01  # the label's lr wins over the common one


def _quality_cells_load(quality, regime: str, labels: list[str]) -> None:
    ranks = quality.client_ranks(regime)  # the report labels clients with these
    for label in labels:
        recipe = quality.METHODS[label][0]
        if recipe is not None:
            path = quality.recipe_path(recipe)
            over = quality.overrides(label, regime=regime, seed=0, extra=["output_dir=/tmp/x"])
            cfg = load_recipe(path, over)
            assert cfg.data.num_clients in (4, 8), label
            assert (cfg.privacy.mode == "client") == (regime == "clientdp"), label
            assert {p: cfg.client_rank(p) for p in range(cfg.data.num_clients)} == ranks, label


def test_a_dtype_may_be_spelled_either_way_in_every_field() -> None:
    """model.dtype and compression.dtype keep torch's names, federation.precision the short
    ones; each takes the other spelling (a recipe mixing them is not a typo)."""
    cfg = load_recipe(
        TINY_RECIPE,
        ["model.dtype=bf16", "compression.dtype=fp16", "federation.precision=bfloat16"],
    )
    assert (cfg.model.dtype, cfg.compression.dtype, cfg.federation.precision) == (
        "bfloat16",
        "float16",
        "bf16",
    )
    same = load_recipe(
        TINY_RECIPE,
        ["model.dtype=bfloat16", "compression.dtype=float16", "federation.precision=bf16"],
    )
    assert same.fingerprint() == cfg.fingerprint()
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        load_recipe(TINY_RECIPE, ["model.dtype=bf17"])


def test_an_override_turns_off_a_feature_the_recipe_has() -> None:
    fedprox = Path(__file__).parents[1] / "recipes" / "fedprox.yaml"
    assert "fedprox" in load_recipe(fedprox, []).features
    off = load_recipe(fedprox, ["features.fedprox=false"])
    assert "fedprox" not in off.features
    assert off.fingerprint() == load_recipe(fedprox, ["features={}"]).fingerprint()
    on = load_recipe(fedprox, ["features.fedprox=true"])  # on: the recipe's options kept
    assert on.features == load_recipe(fedprox, []).features and on.features["fedprox"]


def test_a_number_in_exponent_form_is_a_float_in_the_file_and_on_the_command_line(
    tmp_path: Path,
) -> None:
    """PyYAML (YAML 1.1) reads `1e-3` as text; recipes read it as YAML 1.2 does, a float."""
    path = tmp_path / "r.yaml"
    text = TINY_RECIPE.read_text().replace("aggregator:", "aggregator:\n  options: {lam: 1e-3}", 1)
    path.write_text(text)
    cfg = load_recipe(path, [f"output_dir={tmp_path}", "aggregator.name=squeeze"])
    lam = cfg.aggregator.options["lam"]
    assert lam == 0.001 and isinstance(lam, float)
    cfg = load_recipe(path, ["aggregator.name=squeeze", "federation.lr=2e-4"])
    assert cfg.federation.lr == 0.0002
    assert parse_overrides(["a=1E+3", "b=-5e-1", "c=3", "d=x1e3", "e='1e-3'"]) == {
        "a": 1000.0,
        "b": -0.5,
        "c": 3,
        "d": "x1e3",
        "e": "1e-3",
    }


def test_a_name_yaml_would_read_as_a_date_or_number(tmp_path: Path) -> None:
    cfg = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "name=2024-01-01"])
    assert cfg.name == "2024-01-01"  # no dates in recipes: the text
    for value, kind in (("20240101", "a number"), ("no", "true/false")):
        with pytest.raises(ConfigError, match=rf"name: .*YAML reads it as {kind}: quote it"):
            load_recipe(TINY_RECIPE, [f"name={value}"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rounds=3", "rounds: unknown key (did you mean 'federation.rounds'?)"),
        ("lr=0.1", "lr: unknown key (did you mean 'federation.lr'?)"),  # not 'lora'
        ("data.rounds=2", "data.rounds: unknown key (did you mean 'federation.rounds'?)"),
        ("federation.roundz=3", "federation.roundz: unknown key (did you mean 'rounds'?)"),
        # a close key of the section itself beats the same key in a section below or beside it
        ("lora.rank=8", "lora.rank: unknown key (did you mean 'ranks'?)"),
        ("data.clients=3", "data.clients: unknown key (did you mean 'num_clients'?)"),
        ("aggregator.name=FedIT", "aggregator.name: unknown value 'FedIT' (did you mean 'fedit'?)"),
        # the same key in another section beats a loose match here (not 'evaluate_clients')
        ("federation.num_clients=3", "(did you mean 'data.num_clients'?)"),
        ("data.precision=fp32", "(did you mean 'federation.precision'?)"),
        # a capitalised key is a key, not one of a union's forms (was an IndexError)
        ("Federation.rounds=2", "Federation: unknown key (did you mean 'federation'?)"),
        ("federation.Rounds=2", "federation.Rounds: unknown key (did you mean 'rounds'?)"),
        (
            "lora.tiers=[{nam: a, rank: 2, clients: 3}]",
            "lora.tiers.0.nam: unknown key (did you mean 'name'?); valid keys here: clients, name,",
        ),
        # a feature, a feature's option, an aggregator's option outside their sections (h110)
        ("fedprox={mu: 0.01}", "fedprox: unknown key (did you mean 'features.fedprox'?)"),
        ("federation.mu=0.01", "federation.mu: unknown key (did you mean 'features.fedprox.mu'?)"),
        (
            "aggregator.oversample=16",
            "aggregator.oversample: unknown key (did you mean 'aggregator.options.oversample'?)",
        ),
        (
            "devices=[{clients: 3, slowdwn: 2}]",
            "devices.0.slowdwn: unknown key (did you mean 'slowdown'?); valid keys here: clients,",
        ),
    ],
)
def test_a_key_in_the_wrong_place_or_a_list_entry_gets_a_suggestion(
    override: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(TINY_RECIPE, [override])
    assert expected in str(info.value)


def test_short_forms_turn_things_on_and_an_empty_override_clears(tmp_path: Path) -> None:
    cfg = load_recipe(TINY_RECIPE, ["features.fedprox=true", "aggregator=fedit"])
    assert cfg.features == {"fedprox": {}} and cfg.aggregator.name == "fedit"  # defaults
    path = tmp_path / "r.yaml"
    text = TINY_RECIPE.read_text().replace("aggregator:", "aggregator:\n  options: {lam: 0.5}", 1)
    path.write_text(text)
    kept = load_recipe(path, ["aggregator.name=squeeze", "aggregator.options.oversample=4"])
    assert kept.aggregator.options == {"lam": 0.5, "oversample": 4}  # options merge
    cleared = load_recipe(path, ["aggregator.name=squeeze", "aggregator.options={}"])
    assert cleared.aggregator.options == {}


def test_a_section_error_that_names_its_own_key_is_not_prefixed_twice() -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(TINY_RECIPE, ["privacy.mode=client", "privacy.noise_multiplier=1"])
    assert "\n  privacy.noise_multiplier does not apply to privacy.mode='client'" in str(info.value)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_written_out_reads_back_the_same(path: Path) -> None:
    """run_dir/recipe.yaml, the recipe a SuperNode receives: text that YAML 1.2 reads as a
    float is quoted ("1e5"), and trackers that are off are not written as `mlflow: null` (which
    turns mlflow on)."""
    for extra in ([], ["name='1e5'", "output.trackers=[tensorboard]"]):
        cfg = load_recipe(path, extra)
        assert build_config(load_yaml(cfg.to_yaml())) == cfg


def test_the_aggregator_short_form_merges_with_its_keys_in_any_order(tmp_path: Path) -> None:
    for overrides in (
        ["aggregator=fedit", "aggregator.global_rank=8"],
        ["aggregator.global_rank=8", "aggregator=fedit"],
    ):
        agg = load_recipe(TINY_RECIPE, overrides).aggregator
        assert (agg.name, agg.global_rank) == ("fedit", 8), overrides
    path = tmp_path / "short.yaml"
    text = TINY_RECIPE.read_text()
    path.write_text(text[: text.index("aggregator:")] + "aggregator: fedit\n")
    agg = load_recipe(path, ["aggregator.global_rank=8"]).aggregator  # not squeeze at rank 8
    assert (agg.name, agg.global_rank) == ("fedit", 8)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # the tiny model's heads must split its width (else the first forward pass fails)
        ("model.tiny.num_heads=3", "hidden_size (64) must split into num_heads (3) heads of an"),
        # heads of an odd size: RoPE rotates pairs of dimensions
        ("model.tiny.hidden_size=60", "valid here: 1, 2, 3, 5, 6, 10, 15, 30"),
        ("model.tiny.num_kv_heads=3", "num_heads (4) must be a multiple of num_kv_heads (3)"),
        # inf passes `> 0`: an endless epoch count, an infinite lr
        ("federation.lr=.inf", "federation.lr: Input should be a finite number (got inf)"),
        ("federation.local_epochs=.inf", "federation.local_epochs: Input should be a finite"),
        ("features.fedprox={mu: .inf}", "finite number"),
        # ranks beside tiers would be silently unused
        ("lora.tiers=[{name: a, rank: 4, clients: 3}]", "lora.ranks ([2, 4, 8]) and lora.tiers"),
        # a section given a value or left empty: its keys, not pydantic's class name
        ("model=tiny", "model: is a section of keys (name, dtype,"),
        ("model=tiny", "did you mean model: {name: tiny}?"),
        ("federation=null", "federation: is empty; give its keys (rounds,"),
        ("name=my run", "'my run' is not a run name: it names the run's folder"),
        # a warm-up the schedule never leaves (tiny: 2 rounds × 10 steps)
        ("federation.warmup_steps=20", "federation.warmup_steps (20) is not shorter than the "),
    ],
)
def test_a_value_that_would_fail_later_is_refused_by_its_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(TINY_RECIPE, [override])
    assert expected in str(info.value)
    assert "ModelConfig" not in str(info.value) and "FederationConfig" not in str(info.value)


def test_tiers_with_ranks_null_are_fine_and_a_run_s_recipe_yaml_loads_back(tmp_path: Path) -> None:
    cfg = load_recipe(
        TINY_RECIPE, ["lora.tiers=[{name: a, rank: 4, clients: 3}]", "lora.ranks=null"]
    )
    assert [cfg.client_rank(p) for p in range(3)] == [4, 4, 4]
    # a recipe without ranks: its recipe.yaml writes the default (8) beside the tiers
    tier = {"name": "a", "rank": 4, "clients": 3}
    tiered = build_config({"data": {"num_clients": 3}, "lora": {"tiers": [tier]}})
    (tmp_path / "recipe.yaml").write_text(tiered.to_yaml())
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again.lora.ranks == 8 and again.fingerprint() == tiered.fingerprint()


def test_a_warmup_inside_the_schedule_is_fine() -> None:
    assert load_recipe(TINY_RECIPE, ["federation.warmup_steps=19"]).federation.warmup_steps == 19
    # per-round schedule: 10 steps; epochs: the steps depend on each shard, not checked here
    with pytest.raises(ConfigError, match="schedule's 10 steps"):
        load_recipe(TINY_RECIPE, ["federation.warmup_steps=10", "federation.schedule_scope=round"])
    epochs = [
        "federation.local_steps=null",
        "federation.local_epochs=1",
        "federation.warmup_steps=99",
    ]
    assert load_recipe(TINY_RECIPE, epochs).federation.warmup_steps == 99


def test_a_list_entry_given_a_word_gets_no_name_only_fix() -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(TINY_RECIPE, ["lora.tiers=[phone]"])
    assert "lora.tiers.0: is a section of keys (name, rank, clients" in str(info.value)
    assert "did you mean" not in str(info.value)  # a tier needs a rank and clients too


def test_a_feature_given_a_bare_value_is_told_to_use_a_mapping() -> None:
    # h95: `features.fedprox=0.01` said only "Input should be a valid dictionary"
    with pytest.raises(ConfigError, match=r"features\.fedprox takes its options as a mapping"):
        load_recipe(str(TINY_RECIPE), ["features.fedprox=0.01"])
    assert load_recipe(str(TINY_RECIPE), ["features.fedprox=true"]).features == {"fedprox": {}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "features=[fedprox]",
            r"features: .*\(got \['fedprox'\]\); write a mapping, e\.g\. \{fedprox: \{\}\}",
        ),
        ("data.pos=noun", r"data\.pos: .*\(got 'noun'\); write a list, e\.g\. \[noun\]"),
        (
            "lora.target_modules={q_proj: 1}",
            r"\(got \{'q_proj': 1\}\); write a list, e\.g\. \[q_proj\]",
        ),
        (
            "lora.target_modules=all-linear",
            r"'all-linear' \(peft's shortcut\) is not supported: list",
        ),
    ],
)
def test_a_value_of_the_wrong_shape_gets_the_shape_it_needs(override: str, expected: str) -> None:
    # h110: pydantic's bare "Input should be a valid list" named no form that would do
    with pytest.raises(ConfigError, match=expected):
        load_recipe(TINY_RECIPE, [override])


def test_a_misspelt_required_key_is_said_once() -> None:
    # h110: `rnak` got its did-you-mean and then "lora.tiers.0.rank: Field required" as well
    with pytest.raises(ConfigError) as info:
        load_recipe(TINY_RECIPE, ["lora.tiers=[{name: a, rnak: 2, clients: 3}]"])
    assert "lora.tiers.0.rnak: unknown key (did you mean 'rank'?)" in str(info.value)
    assert "Field required" not in str(info.value)
    with pytest.raises(ConfigError, match=r"lora\.tiers\.0\.rank: Field required"):  # none given
        load_recipe(TINY_RECIPE, ["lora.tiers=[{name: a, clients: 3}]"])
