"""The one device/dtype resolver: `auto` follows the CPU's bf16 units; names map as documented."""
import pytest
import torch

from minir1ci.inference import devices

CPU = torch.device("cpu")


@pytest.fixture
def bf16_units(monkeypatch):
    """Fake the CPU capability: set(True) for a CPU with AMX-BF16, set(False) for one without."""
    def set_units(present: bool) -> None:
        caps = {"amx_bf16": present, "avx512_bf16": False, "avx2": True}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    return set_units


def test_cpu_capability_read_from_torch(bf16_units):
    bf16_units(True)
    assert devices.cpu_has_bf16_units()
    bf16_units(False)
    assert not devices.cpu_has_bf16_units()


def test_auto_inference_dtype_follows_bf16_units(bf16_units):
    bf16_units(True)
    assert devices.inference_dtype("auto", CPU) is torch.bfloat16
    bf16_units(False)  # today's behaviour: fp32 on a CPU without bf16 units
    assert devices.inference_dtype("auto", CPU) is torch.float32
    assert devices.inference_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_auto_rollout_dtype_samples_where_inference_does(bf16_units):
    bf16_units(True)     # a bf16 copy of the policy on a CPU with bf16 units, as evaluation uses
    assert devices.rollout_dtype("auto", CPU) is torch.bfloat16
    bf16_units(False)    # None: the fp32 policy samples itself, no copy
    assert devices.rollout_dtype("auto", CPU) is None and devices.rollout_dtype("float32", CPU) is None
    assert devices.rollout_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_named_dtypes_override_auto(bf16_units):
    bf16_units(True)
    for name, want in (("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
                       ("bfloat16", torch.bfloat16), ("fp16", torch.float16), ("float16", torch.float16)):
        assert devices.inference_dtype(name, CPU) is want
    with pytest.raises(ValueError, match="unknown dtype 'bf61'"):
        devices.inference_dtype("bf61", CPU)


def test_training_autocast_only_when_asked_on_cpu(bf16_units):
    bf16_units(True)  # even with bf16 units: the tiny preset trains faster in fp32
    assert devices.train_autocast_dtype("auto", CPU) is None
    assert devices.train_autocast_dtype("float32", CPU) is None
    assert devices.train_autocast_dtype("bf16", CPU) is torch.bfloat16
    assert devices.train_autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    with devices.autocast_for(CPU, "bfloat16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype is torch.bfloat16
    with devices.autocast_for(CPU, "auto"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype is torch.float32


def test_resolve_device():
    assert devices.resolve_device("cpu") == CPU
    assert devices.pick_device("cpu") == CPU
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    if not torch.cuda.is_available():
        assert devices.resolve_device("auto") == CPU
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        devices.resolve_device("gpu0")
