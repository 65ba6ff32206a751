"""Typed configs (``loralab.config``): every option of every group and every experiment composes (Hydra compose
API), passes ``check`` and resolves fully; every bad value fails as one line ``key=value: rule``; LoRA is on unless
a config says ``lora.enabled: false`` (nothing reads the command line for it); ``resolve_hardware`` fills ``auto``
and says what it filled."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF_DIR, LABELS, compose_train, typed_conf
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from peft import LoraConfig

from loralab.config import ConfigError, check, resolve_hardware

# Options that only fit a regression task, composed inside the experiment that selects it.
EXPERIMENT_OF = {
    ("task", "text_regression"): "article_regression",
    ("task", "tabular_regression"): "marketsentinel",
    ("data", "articles"): "article_regression",
    ("data", "marketsentinel"): "marketsentinel",
    ("model", "mlp"): "marketsentinel",
    ("loss", "mse"): "article_regression",
    ("loss", "head_mse"): "marketsentinel",
}
GROUP_OPTIONS = sorted((p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml") if p.parent.name != "hydra")


@pytest.fixture(autouse=True)
def no_hydra_app():
    """``check`` names a mismatched option by Hydra's runtime choices when an app is running; none is here."""
    HydraConfig.instance().cfg = None
    yield
    HydraConfig.instance().cfg = None


def test_every_group_has_been_found():
    groups = {g for g, _ in GROUP_OPTIONS}
    assert {
        "task",
        "data",
        "lora",
        "pretrain",
        "model",
        "loss",
        "optim",
        "trainer",
        "hardware",
        "tracking",
        "calibration",
        "export",
        "distributed",
        "baseline",
        "sweep",
        "experiment",
        "serialize",
        "ensemble",
        "decision",
    } <= groups


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_checks_and_resolves(group, option, tmp_path, fake_cuda):
    overrides = [f"{group}={option}"]
    if (group, option) in EXPERIMENT_OF:
        overrides.insert(0, f"experiment={EXPERIMENT_OF[group, option]}")
    if (group, option) == ("data", "jsonl"):
        (tmp_path / "train.jsonl").touch()
        overrides.append(f"data.train_file={tmp_path / 'train.jsonl'}")
    if (group, option) == ("model", "hf"):
        overrides.append("model.hub_id=google-bert/bert-base-uncased")  # checked, never read: no network
    cfg = compose_train(*overrides, hydra_config=True)
    assert OmegaConf.select(cfg, f"hydra.runtime.choices.{group}") == option
    # The compose API leaves hydra.runtime.output_dir (paths.output_dir reads it) for @hydra.main to fill in.
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig().set_config(cfg)
    checked = check(cfg)  # GPU profiles need CUDA: fake_cuda makes torch see an 80 GB card
    resolved = OmegaConf.to_container(checked, resolve=True, throw_on_missing=True)
    assert resolved["paths"]["output_dir"] == str(tmp_path) and "hydra" not in resolved
    assert resolved["task"]["name"] == checked.task.name


def test_gpu_profiles_refuse_clearly_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^hardware.device='cuda': CUDA is not available here"):
        check(compose_train("hardware=rtx3050"))


def test_check_keeps_a_config_the_run_can_use():
    cfg = check(compose_train("model=qwen2_5_0_5b"))
    # idempotent: a sweep job may check what a launcher checked
    assert OmegaConf.to_container(check(cfg)) == OmegaConf.to_container(cfg)
    assert OmegaConf.select(cfg, "optim.optimizer.lr") == cfg.optim.lr == 2e-4  # interpolations still resolve
    assert cfg.hardware.precision == "fp32" and f"{cfg.hardware.precision}" == "fp32"  # StrEnum reads as str
    assert isinstance(instantiate(cfg.lora), LoraConfig)
    assert instantiate(cfg.loss, class_weights=[1.0, 2.0, 3.0]).gamma == cfg.loss.gamma == 1.0
    opt = instantiate(cfg.optim.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    assert opt.defaults["lr"] == 2e-4
    with pytest.raises(Exception, match="typo"):  # typed: a key that is not in the schema cannot be added later
        cfg.optim.typo = 1


def test_interpolations_and_resolvers_survive_check():
    cfg = check(compose_train())
    raw = OmegaConf.to_container(cfg)  # unresolved
    assert raw["tracking"]["run_name"].startswith("${task_name}-${now:")
    assert raw["pretrain"]["cache_dir"] == "${oc.env:LORALAB_CACHE,${paths.root_dir}/.cache}/pretrain"
    assert raw["paths"]["output_dir"] == "${hydra:runtime.output_dir}"


USER_KEYS = {
    "data.train_file": "/data/t.jsonl",
    "data.val_file": "/data/v.jsonl",
    "data.labels": ["up", "down"],
    "lora.r": 4,
    "lora.lora_alpha": 32,
    "lora.lora_dropout": 0.1,
    "lora.target_modules": ["q_proj"],
    "loss.gamma": 2.5,
    "loss.class_weights": [1.0, 2.0],
    "optim.lr": 0.001,
    "optim.batch_size": 4,
    "trainer.max_epochs": 3,
    "trainer.early_stopping.patience": 5,
    "seed": 7,
    "tracking.uri": "sqlite:///x.db",
    "tracking.experiment": "exp",
}


def test_user_facing_keys_exist_and_override():
    def fmt(v):
        return "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)

    cfg = compose_train("lora=default", *(f"{k}={fmt(v)}" for k, v in USER_KEYS.items()))
    for key, value in USER_KEYS.items():
        got = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value, key


def test_default_labels():
    assert list(compose_train().data.labels) == LABELS


# (overrides, key, value, words of the rule): each must fail as ONE line "key=value: rule".
BAD_VALUES = [
    (["optim.lr=abc"], "optim.lr", "'abc'", "must be a float"),
    (["optim.lr=0"], "optim.lr", "0", "> 0"),
    (["+lora.rank=16"], "lora.rank", "16", "unknown key (known: enabled, task_type, r, lora_alpha"),
    (["+foo=1"], "foo", "1", "unknown key"),
    (["hardware.precision=fp33"], "hardware.precision", "'fp33'", "must be one of fp32, bf16, fp16"),
    (["hardware.preflight=maybe"], "hardware.preflight", "'maybe'", "must be one of error, warn, off"),
    (["hardware.micro_batch_size=0"], "hardware.micro_batch_size", "0", "must be auto, an int > 0 or null"),
    (["hardware.device=gpu"], "hardware.device", "'gpu'", "cuda:<index>"),
    (["hardware.load_in_4bit=true"], "hardware.load_in_4bit", "True", "needs a CUDA device"),
    (["data=jsonl"], "data.train_file", "'???'", "missing value"),
    (
        ["data=jsonl", "data.train_file=/nonexistent/train.jsonl"],
        "data.train_file",
        "/nonexistent/train.jsonl",
        "not found",
    ),
    (["data.labels=[]"], "data.labels", "[]", "non-empty"),
    (["data.labels=[long,short,long]"], "data.labels", "['long', 'short', 'long']", "unique"),
    (["tracking.alias=latest"], "tracking.alias", "'latest'", "MLflow reserves them"),
    (["tracking.alias=v2"], "tracking.alias", "'v2'", "not latest or v<N>"),
    (["data.labels=[long,short?,skip]"], "data.labels.1", "'short?'", "part of MLflow metric names"),
    (["data.labels=[long,'sé',skip]"], "data.labels.1", "'sé'", "letters, digits, _ - . : / and spaces"),
    ([f"data.labels=[long,{'s' * 201},skip]"], "data.labels.1", "'sss", "at most 200"),
    (["data.val_split=1.5"], "data.val_split", "1.5", "(0, 1)"),
    (["data.template=plain"], "data.template", "'plain'", "must contain {features} and no other {field}"),
    (["data.template='{features}{oops}'"], "data.template", "'{features}{oops}'", "no other {field}"),
    (["data.leakage=ignore"], "data.leakage", "'ignore'", "warn, drop, error"),
    (["data.split=shuffled"], "data.split", "'shuffled'", "random, time, walk_forward"),
    (["data.split=walk_forward"], "data.val_file", "val.jsonl", "set data.val_file=null"),
    (["data.split=walk_forward", "data.val_file=null", "data.fold=0"], "data.fold", "0", "fold 0 has no past"),
    (["data.split=walk_forward", "data.val_file=null", "data.fold=5"], "data.fold", "5", "< data.folds=5"),
    (["data.folds=1"], "data.folds", "1", ">= 2"),
    (["data.max_train=0"], "data.max_train", "0", ">= 1 or null"),
    (["data.time_key=id", "data.time_pattern='(a)(b)'"], "data.time_pattern", "(a)(b)", "at most one group"),
    (["data.time_key=id", "data.time_pattern='(unclosed'"], "data.time_pattern", "(unclosed", "regular expression"),
    (["data.time_key=id", "data.time_format=Ymd"], "data.time_format", "'Ymd'", "strptime format"),
    (["data.time_format=%Y%m%d"], "data.time_format", "%Y%m%d", "reads data.time_key: set it too"),
    (["data.label_horizon=-1"], "data.label_horizon", "-1", "a number >= 0"),
    (["data.time_key=id", "data.embargo=4x"], "data.embargo", "'4x'", "a duration such as 4h"),
    (["data.label_horizon=4h"], "data.label_horizon", "'4h'", "needs data.time_key"),
    (["model=mlp"], "model", "'mlp'", "does not fit task classification (it fits tabular_regression)"),
    (["loss=mse"], "loss", "mse", "does not fit task classification"),
    (["data=articles"], "data", "'articles'", "does not fit task classification (it fits text_regression)"),
    (["model.truncation_side=middle"], "model.truncation_side", "'middle'", "left, right"),
    (["model.pretrained=false", "model.arch=null"], "model.arch", "None", "pretrained=false needs"),
    (["trainer.max_epochs=0"], "trainer.max_epochs", "0", ">= 1"),
    (["trainer.early_stopping.patience=-1"], "trainer.early_stopping.patience", "-1", ">= 0"),
    (["trainer.save_top_k=0"], "trainer.save_top_k", "0", ">= 1"),
    (["trainer.monitor=val_f1"], "trainer.monitor", "'val_f1'", "val_macro_f1"),
    (["trainer.monitor=val_mae"], "trainer.monitor", "'val_mae'", "val_<precision|recall|f1>_<label>"),
    (["trainer.monitor=val_loss"], "trainer.monitor_mode", "'max'", "val_loss is an error: must be min"),
    (["objective=val_r2"], "objective", "'val_r2'", "val_macro_f1"),
    (["trainer.gates.val_accuracy=high"], "trainer.gates.val_accuracy", "'high'", "<op> <number>"),
    (["seed=abc"], "seed", "'abc'", "must be an int"),
    (["quiet=maybe"], "quiet", "'maybe'", "must be auto, true or false"),
    (["loss.gamma=-1"], "loss.gamma", "-1", ">= 0"),
    (["loss.class_weights=[1,2]"], "loss.class_weights", "[1, 2]", "one weight per label (3)"),
    (["loss.class_weights=inverse"], "loss.class_weights", "'inverse'", "auto, sqrt_inverse, none"),
    (["lora.r=0"], "lora.r", "0", "> 0"),
    (["lora=default", "lora.r=-4"], "lora.r", "-4", "> 0"),
    (["lora=default", "lora.lora_dropout=1.0"], "lora.lora_dropout", "1.0", "[0, 1)"),
    (
        ["lora=default", "lora.target_modules=[]"],
        "lora.target_modules",
        "[]",
        "all-linear or a non-empty list of module names",
    ),
    (["lora.r=null"], "lora.r", "None", "LoRA needs a rank"),
    (["pretrain.epochs=0"], "pretrain.epochs", "0", ">= 1"),
    (["pretrain.min_steps=-1"], "pretrain.min_steps", "-1", ">= 0"),
    (["pretrain.lr=0"], "pretrain.lr", "0", "> 0"),
    (["pretrain.holdout=0"], "pretrain.holdout", "0", "(0, 1)"),
    (["pretrain.splits=[train,test]"], "pretrain.splits.1", "'test'", "must be train or val"),
    (["pretrain=clm", "pretrain.splits=[]"], "pretrain.splits", "[]", "no texts to pretrain on"),
    (
        ["pretrain=clm", "pretrain.extra_files=[/nonexistent/more.jsonl]"],
        "pretrain.extra_files.0",
        "/nonexistent/more.jsonl",
        "file not found",
    ),
    (["pretrain.train=partial"], "pretrain.train", "'partial'", "must be one of full, lora"),
    (["experiment=marketsentinel", "pretrain=clm"], "pretrain", "'clm'", "needs a text model"),
    (
        ["optim.batch_size=10", "hardware.micro_batch_size=4"],
        "optim.batch_size",
        "10",
        "not divisible by hardware.micro_batch_size=4",
    ),
    (["optim.warmup_ratio=1"], "optim.warmup_ratio", "1.0", "[0, 1)"),
    (["optim.scheduler=cosin"], "optim.scheduler", "'cosin'", "get_scheduler name"),
    (["optim.scheduler=reduce_lr_on_plateau"], "optim.scheduler", "'reduce_lr_on_plateau'", "per optimizer step"),
    (["optim.max_grad_norm=0"], "optim.max_grad_norm", "0.0", "> 0 or null"),
    (["+optim.optimizer.betas=[0.9,0.95]"], "optim.optimizer.betas", "[0.9, 0.95]", "unknown key"),
    (["calibration.method=platt"], "calibration.method", "'platt'", "temperature, none"),
    (["calibration.t_bounds=[2,5]"], "calibration.t_bounds", "[2.0, 5.0]", "0 < lo < 1 < hi"),
    (["calibration.n_bins=0"], "calibration.n_bins", "0", ">= 1"),
    (["export.zip_parts=[merged]"], "export.zip_parts", "['merged']", "needs loralab.json"),
    (["export.zip_parts=[merged,loralab.json,weights]"], "export.zip_parts", "weights", "allowed parts"),
    (["export.max_size_mb=0"], "export.max_size_mb", "0", "> 0"),
    (["baseline.name=xgb"], "baseline.name", "'xgb'", "hgb, logreg"),
    (["ensemble=blend", "baseline=none"], "ensemble", "'blend'", "needs the in-run baseline"),
    (["ensemble=blend", "ensemble.folds=1"], "ensemble.folds", "1", ">= 2"),
    (["ensemble=blend", "ensemble.select=auc"], "ensemble.select", "'auc'", "macro_f1, log_loss"),
    (
        ["ensemble=blend", "export.zip_parts=[merged,loralab.json]"],
        "export.zip_parts",
        "merged",
        "the zip needs baseline",
    ),
    (["experiment=marketsentinel", "ensemble=blend"], "ensemble", "'blend'", "task is tabular_regression"),
    (["decision=precision", "decision.fallback=hold"], "decision.fallback", "'hold'", "must be one of data.labels"),
    (["decision=precision", "+decision.targets.skip=0.7"], "decision.targets.skip", "0.7", "is decision.fallback"),
    (["decision=precision", "+decision.targets.flat=0.7"], "decision.targets.flat", "0.7", "names no label of"),
    (["decision=precision", "decision.targets.long=0"], "decision.targets.long", "0.0", "must be in (0, 1]"),
    (["decision=precision", "decision.targets.short=1.5"], "decision.targets.short", "1.5", "must be in (0, 1]"),
    (["decision=precision", "decision.min_rows=0"], "decision.min_rows", "0", ">= 1"),
    (["decision=precision", "ensemble=blend", "decision.folds=3"], "decision.folds", "3", "must equal ensemble.folds"),
    (["experiment=marketsentinel", "decision=precision"], "decision", "'precision'", "task is tabular_regression"),
    (["experiment=marketsentinel", "hardware.packing=true"], "hardware.packing", "True", "the MLP reads no token"),
    (["distributed.backend=mpi"], "distributed.backend", "'mpi'", "auto, nccl, gloo"),
    (["task=text_regression"], "data", "demo|jsonl", "does not fit task text_regression"),
    (["experiment=marketsentinel", "model.hidden_dim=0"], "model.hidden_dim", "0", "must be > 0"),
    (["experiment=marketsentinel", "lora=default"], "lora.enabled", "True", "LoRA applies to Qwen2 models"),
    (["experiment=marketsentinel", "hardware.precision=bf16"], "hardware.precision", "'bf16'", "trains in fp32"),
    (
        ["experiment=marketsentinel", "trainer.monitor=val_r2_head_9"],
        "trainer.monitor",
        "'val_r2_head_9'",
        "val_<mse|mae|rmse|r2>_<target>",
    ),
    (
        ["experiment=article_regression", "data.template=no fields"],
        "data.template",
        "'no fields'",
        "must contain {title} and/or {content} and no other {field}",
    ),
    (["experiment=article_regression", "data.dimension_names=[a,a]"], "data.dimension_names", "['a', 'a']", "unique"),
    (["experiment=article_regression", "data.score_tiers=0"], "data.score_tiers", "0", ">= 1"),
    (
        ["experiment=article_regression", "trainer.monitor=val_f1"],
        "trainer.monitor",
        "'val_f1'",
        "val_<mse|mae|rmse|r2>_<target>",
    ),
    (["experiment=article_regression", "loss=focal"], "loss", "focal", "does not fit task text_regression"),
    (["optim.lr=${oc.env:LORALAB_TEST_UNSET_LR,abc}"], "optim.lr", "oc.env", "resolves to 'abc', must be a float"),
    (["serialize=bins", "serialize.n_bins=1"], "serialize.n_bins", "1", "[2, 36]"),
    (["serialize=kv", "serialize.digits=0"], "serialize.digits", "0", ">= 1 or null"),
    (["serialize=json", "+serialize.n_bins=4"], "serialize.n_bins", "4", "unknown key (known: template)"),
    (["serialize._target_=os.system"], "serialize._target_", "'os.system'", "must be one of loralab.data.serialize"),
    (["trainer.max_epochs=many"], "trainer.max_epochs", "'many'", "must be auto, an int >= 1"),
    (["trainer.min_steps=0"], "trainer.min_steps", "0", ">= 1"),
    (["trainer.early_stopping.smoothing=1"], "trainer.early_stopping.smoothing", "1.0", "[0, 1)"),
    (["trainer.early_stopping.grace=-1"], "trainer.early_stopping.grace", "-1", ">= 0"),
    (["lora.enabled=sometimes"], "lora.enabled", "'sometimes'", "must be auto, true or false"),
    (["lora.full_from_rows=0"], "lora.full_from_rows", "0", ">= 1"),
    (["lora.full_lr=0"], "lora.full_lr", "0", "> 0"),
]


@pytest.mark.parametrize(("overrides", "key", "value", "rule"), BAD_VALUES, ids=[" ".join(c[0]) for c in BAD_VALUES])
def test_bad_values_fail_in_one_line(overrides, key, value, rule, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        check(compose_train(*overrides))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}=") and value in message and rule in message, message


@pytest.mark.parametrize(
    "overrides, r",
    [
        (["loss.gamma=1.5", "lora.r=16"], 16),  # the README's sweep: python train.py -m ... lora.r=8,16,32
        (["lora.r=32"], 32),
        ([], 8),  # the offline default: tiny_qwen2 + LoRA (on a set under lora.full_from_rows rows)
        (["lora=none"], None),
        (["lora=none", "lora.r=4"], None),  # a rank alone switches nothing: lora=none says off
        (["lora=default", "lora.enabled=false"], None),
        (["model=qwen2_5_0_5b"], 8),  # real models default to LoRA r=8
        (["model=qwen2_5_0_5b", "lora=none"], None),
    ],
)
def test_lora_is_on_unless_a_config_says_off(overrides, r):
    conf = typed_conf(*overrides)
    lora, _ = conf.lora.for_train_rows(conf.lora.full_from_rows - 1, conf.optim)
    assert lora.enabled is (r is not None)
    built = instantiate(lora)
    assert (built.r if built else None) == r


def test_the_tiny_model_trains_adapters_on_small_sets_and_every_weight_on_large_ones():
    conf = typed_conf()
    assert conf.lora.enabled == "auto"
    with pytest.raises(InstantiationException, match="lora.enabled=auto: decide it"):
        instantiate(conf.lora)  # undecided: the run decides once it knows the training rows
    small, optim = conf.lora.for_train_rows(conf.lora.full_from_rows - 1, conf.optim)
    assert small.enabled is True and small.target_modules == "all-linear" and optim is conf.optim
    large, optim = conf.lora.for_train_rows(conf.lora.full_from_rows, conf.optim)
    assert large.enabled is False and instantiate(large) is None
    # exactly what `python train.py lora=none optim.lr=<full_lr>` trains with, the optimizer's own lr included
    assert optim == typed_conf("lora=none", f"optim.lr={conf.lora.full_lr}").optim != conf.optim
    assert optim.optimizer.lr == conf.lora.full_lr
    for fixed in (typed_conf("model=qwen2_5_0_5b"), typed_conf("lora=none")):  # not auto: any size, as configured
        assert fixed.lora.for_train_rows(10**6, fixed.optim) == (fixed.lora, fixed.optim)


@pytest.mark.parametrize(
    "overrides, stage",
    [
        ([], "none"),  # tiny_qwen2: LoRA on the random base (clm: equal or worse, slower; docs/performance.md)
        (["pretrain=clm"], "clm"),
        (["model=qwen2_5_0_5b"], "none"),  # a real checkpoint: domain-adaptive pretraining is opt-in
        (["model=qwen2_5_0_5b", "pretrain=clm"], "clm"),
        (["experiment=article_regression"], "none"),
        (["experiment=marketsentinel"], "none"),
    ],
)
def test_which_models_pretrain_by_default(overrides, stage):
    cfg = check(compose_train(*overrides))
    assert (
        cfg.pretrain.name == stage
        and type(typed_conf(*overrides).pretrain.stage()).__name__
        == {"clm": "CausalLMPretrain", "none": "NoPretrain"}[stage]
    )


def test_cpu_profile_has_nothing_to_resolve():
    cfg = check(compose_train("hardware=cpu"))
    resolved, changed = resolve_hardware(cfg)
    assert changed == {} and OmegaConf.to_container(resolved) == OmegaConf.to_container(cfg)


def test_auto_profile_on_this_machine():
    cfg, changed = resolve_hardware(check(compose_train("hardware=auto")))
    hw = OmegaConf.to_container(cfg.hardware)
    assert "auto" not in [v for k, v in hw.items() if k != "name"] and set(changed) <= {f"hardware.{k}" for k in hw}
    assert all(OmegaConf.select(cfg, key) == value for key, value in changed.items())


@pytest.mark.parametrize(
    "gib, bf16, expected",
    [
        (4.0, False, {"precision": "fp16", "micro_batch_size": 4, "gradient_checkpointing": True}),
        (80.0, True, {"precision": "bf16", "micro_batch_size": 32, "gradient_checkpointing": False}),
    ],
)
def test_auto_profile_on_a_gpu(gib, bf16, expected, fake_cuda):
    fake_cuda(gib, bf16)
    cfg, changed = resolve_hardware(check(compose_train("hardware=auto", "optim.batch_size=32")))
    assert changed == {
        "hardware.device": "cuda",
        "hardware.memory_gib": gib,
        "hardware.pin_memory": True,
        **{f"hardware.{k}": v for k, v in expected.items()},
    }
    assert cfg.hardware.precision == expected["precision"]


def test_resolved_auto_values_are_checked_again(fake_cuda, monkeypatch):
    fake_cuda(4.0)
    cfg = check(compose_train("hardware=auto", "optim.batch_size=10"))  # micro-batch still auto: passes
    with pytest.raises(ConfigError, match=r"^optim.batch_size=10: not divisible by hardware.micro_batch_size=4"):
        resolve_hardware(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto becomes cpu: QLoRA cannot run there
    cfg = check(compose_train("hardware=auto", "hardware.load_in_4bit=true", "model=qwen2_5_0_5b"))
    with pytest.raises(ConfigError, match=r"^hardware.load_in_4bit=True: 4-bit .* needs a CUDA device"):
        resolve_hardware(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [("seed=-1", "seed"), ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("loss.gamma=inf", "loss.gamma")],
)
def test_values_that_used_to_fail_late_fail_in_the_check(override, key):
    """seed=-1 ended in numpy's traceback after the MLflow run started; lr=inf trained NaN for an epoch."""
    with pytest.raises(ConfigError) as err:
        check(compose_train(override))
    assert str(err.value).startswith(f"{key}=") and "\n" not in str(err.value)
