"""The training step inside a real DeepSpeed engine (ZeRO-2, gloo, world size 1, CPU): the
`_unwrap` defect of full fine-tuning, optimizer offload, and the config of a GPU run."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from musiclora.adapters import apply_lora
from musiclora.config import TrainConfig, load_config
from musiclora.models.families import get_family
from musiclora.models.musicgen import _pad_id, _unwrap
from musiclora.train.deepspeed import build_ds_config, build_optimizer, model_dtype
from musiclora.train.loop import train_step
from musiclora.train.trainer import worker_env
from tests.unit.train.helpers import synthetic_batch

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "ray_jobs", "configs")


@pytest.fixture(scope="module")
def single_rank_group():
    """A gloo process group of one rank, as Ray Train starts for one CPU worker."""
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _cfg(*overrides: str) -> TrainConfig:
    return load_config(os.path.join(CONFIGS, "musicgen_melody_tiny.yaml"),
                       ["run.num_workers=1", "data.batch_size=2", *overrides], TrainConfig)


def _engine(model, cfg: TrainConfig):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=build_ds_config(cfg))
    return engine


def test_full_fine_tuning_step_in_a_deepspeed_engine(single_rank_group):
    """`_unwrap` used to stop at the engine (it has a `config` attribute, DeepSpeed's dict), so
    `_pad_id` read `dict.decoder` and the first full fine-tuning step crashed."""
    family = get_family("musicgen-melody")
    loaded = family.load("tiny")
    model = loaded.model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    engine = _engine(model, _cfg())
    assert _unwrap(engine) is model
    assert _pad_id(engine) == 2048
    batch = synthetic_batch(family, loaded)
    before = model.decoder.model.decoder.layers[0].self_attn.q_proj.weight.detach().clone()
    loss = train_step(engine, family, batch)
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.decoder.model.decoder.layers[0].self_attn.q_proj.weight)


def test_unwrap_under_peft_and_deepspeed(single_rank_group):
    family = get_family("musicgen-melody")
    loaded = family.load("tiny")
    inner = loaded.model
    peft_model = apply_lora(inner, family, _cfg().adapter)
    engine = _engine(peft_model, _cfg())
    assert _unwrap(engine) is inner and _unwrap(peft_model) is inner and _unwrap(inner) is inner
    with pytest.raises(TypeError, match="MusicGen-Melody"):
        _unwrap(torch.nn.Linear(2, 2))


def test_optimizer_offload_trains(single_rank_group):
    """offload_optimizer with the client AdamW used to raise (zero_force_ds_cpu_optimizer)."""
    family = get_family("musicgen-melody")
    loaded = family.load("tiny")
    cfg = _cfg("deepspeed.offload_optimizer=true", "optim.lr=0.01", "adapter.lora_dropout=0.0")
    model = apply_lora(loaded.model, family, cfg.adapter).train()
    engine = _engine(model, cfg)
    batch = synthetic_batch(family, loaded)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    losses = [float(train_step(engine, family, batch)) for _ in range(4)]
    assert losses[-1] < losses[0], losses  # the same batch: the loss falls
    assert any(p.detach().abs().sum() > 0 for p in lora_b)  # B starts at zero; the CPU optimizer moved it


def test_gpu_run_config_and_worker_env(monkeypatch):
    """A use_gpu run gets DS_ACCELERATOR=cuda whatever the driver's environment says, bf16, and
    offload pins its CPU buffers."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg = load_config(os.path.join(CONFIGS, "musicgen_melody.yaml"), ["deepspeed.offload_optimizer=true"], TrainConfig)
    assert cfg.run.use_gpu
    assert worker_env(cfg.run.use_gpu)["DS_ACCELERATOR"] == "cuda"
    assert worker_env(False)["DS_ACCELERATOR"] == "cpu"
    ds = build_ds_config(cfg)
    assert ds["bf16"]["enabled"] and model_dtype(cfg) == torch.bfloat16
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in build_ds_config(_cfg())


def test_worker_env_carries_no_secrets(monkeypatch):
    """runtime_env env_vars show in the Ray dashboard and job metadata: keys and tokens stay out."""
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIA-test", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "HF_TOKEN": "hf_x",
                        "AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    env = worker_env(False)
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333" and env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} & set(env)
    assert "s3cr3t" not in str(env) and "hf_x" not in str(env)
