"""The sweep's search space and checks: every key and value validated before any trial."""
import pytest
from ray import tune

from cafe.config import ConfigError, load_config
from tuning.space import parse_dimension, search_space, trial_values, with_values
from tuning.sweep import check_sweep


def sweep_config(*overrides):
    return load_config("configs/sweep-demo.yaml", list(overrides))


def test_distributions_parse_into_tune_domains():
    assert parse_dimension("loss.con_weight", "grid(0.1, 0.5, 1)").to_tune() == tune.grid_search([0.1, 0.5, 1])
    dim = parse_dimension("train.lr", "loguniform(1e-4, 3e-3)")
    assert dim.values == (1e-4, 3e-3) and isinstance(dim.to_tune(), tune.search.sample.Float)
    assert parse_dimension("loss.compute_contrastive_loss", "choice(true, false)").values == (True, False)


@pytest.mark.parametrize("space, message", [
    ({"loss.con_wieght": "grid(0.1, 1)"}, "unknown key 'loss.con_wieght'"),
    ({"loss.con_weight": "normal(0, 1)"}, "is not one of grid"),
    ({"loss.con_weight": "uniform(1, 0.5)"}, "low < high"),
    ({"loss.temperature": "loguniform(0, 1)"}, "0 < low"),
    ({"train.batch_size": "uniform(4, 8)"}, "train.batch_size: expected int"),
    ({"loss.contrastive": "choice(infonce, hinge)"}, "'hinge' is not one of"),
    ({"tune.num_samples": "grid(1, 2)"}, "cannot be swept"),
])
def test_bad_keys_and_distributions_name_the_key(space, message):
    cfg = sweep_config()
    cfg.tune.search_space = space
    with pytest.raises(ConfigError, match=message):
        search_space(cfg)


def test_sweep_checks_objective_and_reports():
    with pytest.raises(ConfigError, match="eval.every_steps > 0"):
        check_sweep(sweep_config("eval.every_steps=0"))
    with pytest.raises(ConfigError, match="comes from no configured suite"):
        check_sweep(sweep_config("tune.objective={eval/retrieval/flickr/i2t_r1: 1.0}"))
    with pytest.raises(ConfigError, match="multiple of eval.every_steps"):
        check_sweep(sweep_config("train.checkpoint_every=7"))
    dims = check_sweep(sweep_config())
    assert [d.key for d in dims] == ["loss.con_weight", "loss.temperature"]


def test_trial_values_land_in_a_validated_config():
    cfg = with_values(sweep_config(), {"loss.con_weight": 0.5, "loss.compute_language_loss": False})
    assert cfg.loss.con_weight == 0.5 and cfg.loss.compute_language_loss is False


def test_arms_run_the_ablation_each_checked_whole():
    cfg = load_config("configs/ablation.yaml", [])
    dims = check_sweep(cfg)
    assert dims[0].key == "arm" and dims[0].to_tune() == tune.grid_search(list(cfg.tune.arms))
    lm_only = with_values(cfg, trial_values(cfg, {"arm": "lm_only"}))
    assert lm_only.loss.compute_contrastive_loss is False and lm_only.loss.compute_language_loss is True
    contrastive_only = with_values(cfg, trial_values(cfg, {"arm": "contrastive_only"}))
    assert contrastive_only.loss.compute_language_loss is False
    bad = load_config("configs/ablation.yaml", [])
    bad.tune.arms = {"cafe": {"loss.con_wieght": 0.5}}
    with pytest.raises(ConfigError, match=r"tune.arms\['cafe'\].*unknown key 'loss.con_wieght'"):
        search_space(bad)
    bad.tune.arms = {"cafe": {"loss.con_weight": 0.5}}
    bad.tune.search_space = {"loss.con_weight": "grid(0.1, 1)"}
    with pytest.raises(ConfigError, match="which tune.search_space also sweeps"):
        search_space(bad)
