"""The verl loss modes: registration on every process, verl's own ``distillation_ppo_loss``
on CPU tensors against an independent computation, the vocab-sharded penalty on two gloo
processes against the unsharded one, and the checks before step one.

Runs in ``.venv-verl`` (``make test-verl``); skips where verl is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

verl = pytest.importorskip("verl")

from conftest import free_port  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.trainer.distillation import distillation_ppo_loss  # noqa: E402
from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY, get_distillation_loss_settings  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.config import DistillationConfig, FSDPActorConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from vocabmetric.errors import ConfigError, FingerprintMismatch, VocabMetricError  # noqa: E402
from vocabmetric.integrations.verl import LOSS_MODES, VocabMetricLossConfig, register  # noqa: E402
from vocabmetric.integrations.verl.topk import reference_topk  # noqa: E402
from vocabmetric.regularizers import regularizer_from_store  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TARGET = "vocabmetric.integrations.verl.VocabMetricLossConfig"
KWARGS = {"vocabmetric_sinkhorn": {"eps": 0.1, "support": 16}, "vocabmetric_tree": {},
          "vocabmetric_sliced": {"n_projections": 8}}
TOPK = 6


# -- registration -------------------------------------------------------------------------
def run_fresh(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code).strip()], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=REPO, timeout=300)


SHOW_MODES = """
from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY as R
print(sorted(m for m in R if m.startswith("vocabmetric_")))
"""
ALL_MODES = str(sorted(LOSS_MODES))


def test_modes_are_in_verls_registry_as_topk_losses():
    register()  # idempotent: a second registration changes nothing
    import vocabmetric.integrations.verl.plugin  # noqa: F401
    for mode in LOSS_MODES:
        assert mode in DISTILLATION_LOSS_REGISTRY
        assert get_distillation_loss_settings(mode).use_topk


def test_a_fresh_process_that_only_imports_verl_has_the_modes():
    """The ``verl.plugins`` entry point: verl imports it on every ``import verl`` (driver and
    every Ray worker)."""
    out = run_fresh("import verl" + SHOW_MODES)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == ALL_MODES


def test_without_the_entry_point_verls_module_hooks_register_them():
    """With plugins off: ``VERL_USE_EXTERNAL_MODULES`` and ``model.external_lib`` (both
    verl's ``import_external_libs``), and the config's ``_target_`` where it is built."""
    off = {"VERL_USE_EXTERNAL_PLUGINS": "none"}
    bare = run_fresh("import verl" + SHOW_MODES, **off)
    assert bare.stdout.strip().splitlines()[-1] == "[]", bare.stderr[-3000:]
    env = run_fresh("import verl" + SHOW_MODES, VERL_USE_EXTERNAL_MODULES="vocabmetric.integrations.verl", **off)
    assert env.stdout.strip().splitlines()[-1] == ALL_MODES, env.stderr[-3000:]
    lib = run_fresh("from verl.utils.import_utils import import_external_libs\n"
                    "import_external_libs('vocabmetric.integrations.verl')" + SHOW_MODES, **off)
    assert lib.stdout.strip().splitlines()[-1] == ALL_MODES, lib.stderr[-3000:]


def test_the_config_target_registers_and_builds_where_verl_builds_it(small_store, tmp_path):
    code = f"""
        from omegaconf import OmegaConf
        from verl.utils.config import omega_conf_to_dataclass
        cfg = OmegaConf.create({{"_target_": "{TARGET}", "loss_mode": "vocabmetric_tree", "topk": 4,
                                "use_policy_gradient": False, "metric_store": "{small_store.path}"}})
        c = type("C", (), {{"distillation_loss": omega_conf_to_dataclass(cfg)}})
        print(type(c.distillation_loss).__name__, c.distillation_loss.loss_settings.use_topk)""" 
    out = run_fresh(code, VERL_USE_EXTERNAL_PLUGINS="none")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "VocabMetricLossConfig True"


# -- verl's own loss on CPU tensors ---------------------------------------------------------
def hydra_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value)


def distillation_config(store, mode, *, model_dir="/nonexistent/model", temperature=1.0, **loss) -> DistillationConfig:
    """As verl builds it: verl's own ppo_trainer.yaml composed by Hydra with the recipe's
    overrides (docs/verl.md), resolved, then ``omega_conf_to_dataclass``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    settings = {"loss_mode": mode, "topk": TOPK, "use_task_rewards": True, "use_policy_gradient": False,
                "distillation_loss_coef": 0.3, "loss_max_clamp": None, "log_prob_min_clamp": None, **loss}
    extra = {"metric_store": str(store.path), "penalty_kwargs": KWARGS.get(mode, {}),
             "tokenizer_path": "${actor_rollout_ref.model.path}",
             "rollout_temperature": "${actor_rollout_ref.rollout.temperature}"}
    for key in list(settings):
        if key in extra:
            extra[key] = settings.pop(key)
    overrides = [
        f"actor_rollout_ref.model.path={model_dir}", "actor_rollout_ref.rollout.name=vllm",
        f"actor_rollout_ref.rollout.temperature={temperature}",
        "distillation.enabled=true", "distillation.n_gpus_per_node=1", "distillation.nnodes=1",
        f"distillation.teacher_models.teacher_model.model_path={model_dir}",
        "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=1",
        f"distillation.distillation_loss._target_={TARGET}",
        *(f"distillation.distillation_loss.{k}={hydra_value(v)}" for k, v in settings.items()),
        *(f"+distillation.distillation_loss.{k}={hydra_value(v)}" for k, v in extra.items()),
    ]
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer/config"), version_base=None):
        cfg = compose("ppo_trainer", overrides=overrides)
    OmegaConf.resolve(cfg)
    return omega_conf_to_dataclass(cfg.distillation)


def actor_config(loss_agg_mode="token-mean") -> FSDPActorConfig:
    return FSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=2,
                           use_dynamic_bsz=False, loss_agg_mode=loss_agg_mode, rollout_n=1)


def teacher_topk(V, n_rows, generator):
    """``(ids, logprobs) [n_rows, k]``: a normalized distribution's top k (mass < 1)."""
    logits = torch.randn(n_rows, V, generator=generator, dtype=torch.float64) * 3
    lp, ids = torch.log_softmax(logits, -1).topk(TOPK, -1)
    return ids.to(torch.int32), lp.float()


def micro_batch(V, *, seed=0):
    """A left/right-padded batch of 3 sequences in verl's layout, then verl's own
    ``left_right_2_no_padding``; the teacher's padding rows are id 0 and log-prob 0."""
    g = torch.Generator().manual_seed(seed)
    B, P, R = 3, 4, 5
    prompt_lens, response_lens = torch.tensor([4, 2, 3]), torch.tensor([5, 3, 1])
    prompts = torch.randint(1, V, (B, P), generator=g)
    responses = torch.randint(1, V, (B, R), generator=g)
    attention = torch.zeros(B, P + R, dtype=torch.int64)
    for b in range(B):
        attention[b, P - prompt_lens[b] : P + response_lens[b]] = 1
    response_mask = attention[:, P:].clone()
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    ids, lp = teacher_topk(V, B * (P + R), g)
    ids, lp = ids.reshape(B, P + R, TOPK), lp.reshape(B, P + R, TOPK)
    pad = attention == 0
    pad[0, 2] = True  # a padding row inside a sequence, as verl's first position may be
    ids[pad], lp[pad] = 0, 0.0
    data = TensorDict({
        "input_ids": torch.cat([prompts, responses], 1), "attention_mask": attention, "position_ids": position_ids,
        "prompts": prompts, "responses": responses, "response_mask": response_mask,
        "old_log_probs": -torch.rand(B, R, generator=g), "advantages": torch.randn(B, R, generator=g),
        "teacher_ids": ids, "teacher_logprobs": lp,
    }, batch_size=[B])
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None, temperature=1.0)
    return data, (ids, lp, attention.bool(), P, response_mask.bool())


def verl_loss(actor, dcfg, data, logits):
    """verl's two calls, with the engine's packing in between (FSDP, remove-padding path)."""
    outputs = distillation_ppo_loss(actor, dcfg, data=data, student_logits=logits[None])
    offsets = data["input_ids"].offsets()
    model_output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets) for k, v in outputs.items()}
    labels = torch.roll(data["input_ids"].values(), -1)
    log_probs = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(log_probs, offsets)
    loss, metrics = distillation_ppo_loss(actor, dcfg, model_output=model_output, data=data)
    return loss, metrics, model_output


def independent_penalty(reg, logits, layout, V):
    """``D [B, R]`` at the response positions, straight from vocabmetric (0 where masked or
    where the teacher row is padding), from the padded layout (no verl code)."""
    ids, lp, attention, P, response_mask = layout
    B, R = response_mask.shape
    flat = torch.zeros(B, attention.shape[1], logits.shape[-1], dtype=logits.dtype)
    flat = flat.masked_scatter(attention[..., None], logits)  # packed rows back to their places
    out = torch.zeros(B, R, dtype=torch.float32)
    for b in range(B):
        for t in range(R):
            pos = P + t - 1  # the position that predicts response token t
            if not response_mask[b, t] or (lp[b, pos] == 0).all():
                continue
            out[b, t] = reg(flat[b, pos, :V][None], (ids[b, pos][None].long(), lp[b, pos][None]))[0]
    return out


@pytest.mark.parametrize("mode", sorted(LOSS_MODES))
def test_verls_loss_is_ppo_plus_beta_times_the_aggregated_penalty(mode, small_store):
    V = small_store.vocab_size
    head = V + 24  # an LM head padded past the tokenizer: cut to the store's V
    dcfg = distillation_config(small_store, mode)
    actor = actor_config()
    data, layout = micro_batch(V)
    nnz = data["input_ids"].values().shape[0]
    logits = (torch.randn(nnz, head) * 2).requires_grad_(True)
    loss, metrics, model_output = verl_loss(actor, dcfg, data, logits)

    reg = regularizer_from_store(small_store, LOSS_MODES[mode], **KWARGS[mode])
    expect_logits = logits.detach().clone().requires_grad_(True)
    D = independent_penalty(reg, expect_logits, layout, V)
    response_mask = layout[4]
    pg, _ = ppo_loss(actor_config(), {"log_probs": model_output["log_probs"]}, data)
    expected = pg + 0.3 * (D * response_mask).sum() / response_mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    logged = metrics[f"vocabmetric/{LOSS_MODES[mode]}"].values[0]
    torch.testing.assert_close(torch.as_tensor(logged), D[response_mask].mean(), rtol=1e-4, atol=1e-6)

    # the gradient: penalty part only (pg's gradient flows through log_probs, the same tensor)
    (grad,) = torch.autograd.grad(loss - pg, logits)
    (expect_grad,) = torch.autograd.grad(0.3 * (D * response_mask).sum() / response_mask.sum(), expect_logits)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, expect_grad, rtol=1e-3, atol=1e-6)
    assert grad[:, V:].abs().max() == 0  # the padded head's logits get no gradient


def test_padding_rows_give_zero_and_a_zero_gradient(small_store):
    V = small_store.vocab_size
    ids = torch.tensor([[0] * TOPK, [5, 7, 9, 11, 13, 15]], dtype=torch.int32)
    lp = torch.tensor([[0.0] * TOPK, [-2.0] * TOPK])  # 6·e⁻² < 1
    clean_ids, clean_lp, valid = reference_topk(ids, lp, V)
    assert valid.tolist() == [False, True] and clean_ids.dtype == torch.int64
    dcfg = distillation_config(small_store, "vocabmetric_tree")
    logits = torch.randn(2, V, requires_grad=True)
    data = TensorDict({"teacher_ids": torch.nested.nested_tensor_from_jagged(ids, torch.tensor([0, 2])),
                       "teacher_logprobs": torch.nested.nested_tensor_from_jagged(lp, torch.tensor([0, 2]))},
                      batch_size=[])
    out = distillation_ppo_loss(actor_config(), dcfg, data=data, student_logits=logits[None])
    values = out["distillation_losses"][0]
    assert values[0] == 0 and values[1] > 0
    (grad,) = torch.autograd.grad(values.sum(), logits)
    assert grad[0].abs().max() == 0 and torch.isfinite(grad).all()


def test_ids_past_the_store_join_the_rest_mass(small_store):
    V = small_store.vocab_size
    ids = torch.tensor([[V + 3, 1, 2]])
    lp = torch.log(torch.tensor([[0.2, 0.5, 0.1]]))
    clean_ids, clean_lp, valid = reference_topk(ids, lp, V)
    assert valid.all() and (clean_ids < V).all() and len(set(clean_ids[0].tolist())) == 3
    assert torch.isneginf(clean_lp[0, 0]) and clean_lp[0, 1:].equal(lp[0, 1:])


# -- tensor parallelism: two gloo processes -------------------------------------------------
TP_WORKER = """
import json, sys, torch, torch.distributed as dist
from vocabmetric import open_store
from vocabmetric.regularizers import regularizer_from_store
from vocabmetric.integrations.verl.tensor_parallel import sharded_penalty
rank, port, store_path, name, kwargs, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
reg = regularizer_from_store(open_store(store_path), name, **json.loads(kwargs))
inputs = torch.load(out + ".inputs.pt")
full = inputs["logits"]
width = full.shape[-1] // 2
shard = full[:, rank * width : (rank + 1) * width].clone().requires_grad_(True)
value = sharded_penalty(reg, shard, inputs["ids"], inputs["logprobs"], vocab_size=reg.vocab_size)
(value * inputs["weights"]).sum().backward()
torch.save({"value": value.detach(), "grad": shard.grad}, f"{out}.{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("name", ["tree", "sliced", "sinkhorn"])
def test_vocab_sharded_penalty_equals_the_unsharded_one_on_two_gloo_ranks(name, small_store, tmp_path):
    V = small_store.vocab_size
    kwargs = KWARGS[f"vocabmetric_{name}"]
    padded = V + (V % 2) + 2  # Megatron pads the vocabulary to a multiple of the TP size
    g = torch.Generator().manual_seed(1)
    n = 5
    logits = torch.randn(n, padded, generator=g, dtype=torch.float64) * 2
    ids, lp = teacher_topk(V, n, g)
    ids, lp, _ = reference_topk(ids, lp.double(), V)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    out = str(tmp_path / "tp")
    torch.save({"logits": logits, "ids": ids, "logprobs": lp, "weights": weights}, out + ".inputs.pt")
    script = tmp_path / "worker.py"
    script.write_text(TP_WORKER)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(small_store.path), name,
                               json.dumps(kwargs), out], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    ranks = [torch.load(f"{out}.{r}.pt") for r in range(2)]

    reg = regularizer_from_store(small_store, name, **kwargs)
    z = logits.clone().requires_grad_(True)
    value = reg(z[:, :V], (ids, lp))
    (value * weights).sum().backward()
    for rank in ranks:
        torch.testing.assert_close(rank["value"], value.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks], -1), z.grad, rtol=1e-6, atol=1e-9)


# -- checks before step one ---------------------------------------------------------------
@contextmanager
def refused_at_start(error: type, match: str):
    """verl builds the config with Hydra, which wraps the check's error (as ``__cause__``)."""
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=match) as info:
        yield
    assert isinstance(info.value.__cause__, error), repr(info.value.__cause__)


def test_a_missing_store_is_a_config_error(tmp_path, small_store):
    with pytest.raises(ConfigError, match="metric_store"):
        VocabMetricLossConfig(loss_mode="vocabmetric_tree", use_policy_gradient=False)
    with pytest.raises(ConfigError, match="does not exist"):
        VocabMetricLossConfig(loss_mode="vocabmetric_tree", use_policy_gradient=False,
                              metric_store=str(tmp_path / "nowhere.zarr"))


def test_temperature_must_be_one(small_store):
    with refused_at_start(ConfigError, "temperature"):
        distillation_config(small_store, "vocabmetric_tree", temperature=0.7)
    dcfg = distillation_config(small_store, "vocabmetric_tree")
    data, _ = micro_batch(small_store.vocab_size)
    tu.assign_non_tensor(data, temperature=0.6)
    with pytest.raises(ConfigError, match="temperature"):
        distillation_ppo_loss(actor_config(), dcfg, data=data,
                              student_logits=torch.randn(1, data["input_ids"].values().shape[0], small_store.vocab_size))


def test_topk_must_fit_the_vocabulary_and_penalty_settings_are_checked(small_store):
    with refused_at_start(ConfigError, "topk"):
        distillation_config(small_store, "vocabmetric_tree", topk=small_store.vocab_size)
    with refused_at_start(ConfigError, "no_such_setting"):
        distillation_config(small_store, "vocabmetric_sinkhorn", penalty_kwargs={"no_such_setting": 1})


def test_the_actor_tokenizer_and_head_are_checked(small_build, small_store, tmp_path, caplog):
    tokenizer_dir = small_build[0].parent  # holds the tokenizer.json the store was built from
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    V = small_store.vocab_size
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": V + 24}))
    with caplog.at_level("INFO", logger="vocabmetric"):
        distillation_config(small_store, "vocabmetric_tree", model_dir=model_dir)
    assert "the penalty uses the first" in caplog.text
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": V - 1}))
    with refused_at_start(FingerprintMismatch, "LM head"):
        distillation_config(small_store, "vocabmetric_tree", model_dir=model_dir)

    from conftest import train_bpe

    other = tmp_path / "other"
    other.mkdir()
    train_bpe(other / "tokenizer.json", vocab_size=600)
    with refused_at_start(FingerprintMismatch, "tokenizer"):
        distillation_config(small_store, "vocabmetric_tree", model_dir=other)


def test_a_fused_kernel_output_is_refused(small_store):
    """With fused kernels verl's engine fills the model output with its own forward KL."""
    dcfg = distillation_config(small_store, "vocabmetric_tree")
    data, _ = micro_batch(small_store.vocab_size)
    fake = {"distillation_losses": data["old_log_probs"], "log_probs": data["old_log_probs"]}
    with pytest.raises(VocabMetricError, match="use_fused_kernels"):
        distillation_ppo_loss(actor_config(), dcfg, model_output=fake, data=data)
