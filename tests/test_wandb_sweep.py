"""W&B Sweeps as a driver: the argument lists `wandb agent` builds from docs/wandb_sweep.yaml (with
wandb's own functions) arrive in resnet_lab as the intended Hydra overrides."""

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from wandb.sdk.launch.sweeps import utils as sweep_utils

import resnet_lab.training.train  # noqa: F401  (registers the schema)
from resnet_lab.config import validate
from tests.conftest import ROOT

SWEEP = yaml.safe_load((ROOT / "docs" / "wandb_sweep.yaml").read_text())


def agent_command(values: dict) -> list:
    """The command `wandb agent` runs for a draw of `values` (wandb_agent.Agent._command_run)."""
    args = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    listed = []
    for chunk in sweep_utils.create_sweep_command(list(SWEEP["command"])):
        listed += args.get(chunk[2:-1], []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return listed


def composed(overrides):
    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def test_the_agents_command_is_resnet_labs_with_the_draws_as_overrides():
    draw = {name: spec["values"][-1] if "values" in spec else spec["min"] for name, spec in SWEEP["parameters"].items()}
    command = agent_command(draw)
    assert command[:4] == ["python", "-m", "resnet_lab", "dataset.val_fraction=0.1"]
    assert command[4] == "hydra.run.dir=outputs/wandb_sweeps/${oc.env:WANDB_SWEEP_ID}/${oc.env:WANDB_RUN_ID}"
    cfg = composed(command[5:])
    validate(cfg)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.trainer.batch_size, cfg.model.name) == (1e-4, 1e-6, 256, "resnet34")


def test_lists_quoted_strings_booleans_and_null_arrive_as_meant():
    values = {"sched.milestones": [0.3, 0.6], "logger.tags": ["a,b", "c d", "it's"], "model.init": "'/w/run,1/model.pt'",
              "trainer.deterministic": True, "optim.nesterov": False, "logger.entity": "null", "optim.lr": 3e-05}
    cfg = composed(agent_command(values)[5:])
    assert list(cfg.sched.milestones) == [0.3, 0.6]
    assert list(cfg.logger.tags) == ["a,b", "c d", "it's"]
    assert cfg.model.init == "/w/run,1/model.pt"
    assert cfg.trainer.deterministic is True and cfg.optim.nesterov is False
    assert cfg.logger.entity is None and cfg.optim.lr == 3e-05


def test_an_unquoted_comma_is_refused_not_taken_for_something_else():
    # Hydra reads key=a,b as a sweep of two values: a single run refuses it rather than train on one.
    override, = agent_command({"model.init": "/w/a,b.pt"})[5:]
    assert OverridesParser.create().parse_override(override).is_sweep_override()
    with pytest.raises(ConfigCompositionException):
        composed([override])
