"""Meshes (plain and hybrid ICI x DCN), logical rules, born-sharded creation and sharded == unsharded
forward (8 fake devices)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.interop.layout import param_variables
from minicpm_jax.model import create_model
from minicpm_jax.sharding import hybrid_devices, logical_spec, make_mesh


def test_mesh_fill_and_errors():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        make_mesh(MeshConfig(data=-1, fsdp=-1))
    with pytest.raises(ValueError, match="use 6 devices, but 8 are available"):
        make_mesh(MeshConfig(data=3, fsdp=2))
    with pytest.raises(ValueError, match="not divisible by the fixed axes"):
        make_mesh(MeshConfig(data=3, fsdp=-1))


def test_sharded_forward_equals_unsharded_and_params_are_sharded():
    cfg = load_config("tiny-minicpm4-longrope", ["model.num_key_value_heads=2"]).model
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    sharded = create_model(cfg, mesh=mesh, seed=5, dtype=jnp.float32)
    plain = create_model(cfg, seed=5, dtype=jnp.float32)
    checked = 0
    for path, var in param_variables(sharded):
        arr = var[...]
        axes = var.get_metadata()["logical_axes"]
        assert arr.sharding.spec == logical_spec(axes), path
        if arr.ndim >= 2:
            shard = arr.addressable_shards[0].data.shape
            assert np.prod(shard) < np.prod(arr.shape), f"{path} is not sharded"
            checked += 1
    assert checked == 1 + 3 * 7 + 1  # embed, 7 matrices per layer, lm_head
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16)))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda x: sharded(x))(ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain(ids)), atol=1e-5)


def test_mesh_that_does_not_divide_names_parameter_dim_and_axis():
    cfg = load_config(
        "tiny-minicpm4", ["model.num_attention_heads=2", "model.num_key_value_heads=1", "model.rope_scaling=null"]
    ).model
    with pytest.raises(ValueError) as info:
        create_model(cfg, mesh=make_mesh(MeshConfig(fsdp=2, tensor=4)))
    text = str(info.value)
    assert (
        "model.layers.0.self_attn.q_proj.kernel: dimension 1 (heads=2) is not divisible by mesh axis tensor of size 4"
        in text
    )
    assert "model.layers.1.self_attn.o_proj.kernel: dimension 0 (heads=2)" in text


def _fake_devices(granule: str, per_granule: list[int]) -> list[SimpleNamespace]:
    sizes = np.repeat(np.arange(len(per_granule)), per_granule)
    kw = {"platform": "cpu", "device_kind": "cpu"}
    return [SimpleNamespace(id=i, **{granule: int(g)}, **kw, process_index=int(g)) for i, g in enumerate(sizes)]


def test_hybrid_mesh_lays_dcn_axes_across_granules():
    shape = {"data": 2, "fsdp": 4, "tensor": 2, "sequence": 1}
    devices = _fake_devices("slice_index", [8, 8])
    grid = hybrid_devices(MeshConfig(data=2, fsdp=4, tensor=2, dcn={"data": 2}), shape, devices)
    assert grid.shape == (2, 4, 2, 1)
    assert [{d.slice_index for d in grid[i].ravel()} for i in range(2)] == [{0}, {1}]  # data rows = slices
    grid = hybrid_devices(MeshConfig(data=2, fsdp=4, tensor=2, dcn={"fsdp": 2}), shape, devices)
    assert [{d.slice_index for d in grid[:, 2 * j : 2 * j + 2].ravel()} for j in range(2)] == [{0}, {1}]
    for d in devices:  # one slice of 2 processes (CPU / GPU hosts): processes are the granules
        d.process_index, d.slice_index = d.slice_index, 0
    grid = hybrid_devices(MeshConfig(data=2, fsdp=4, tensor=2, dcn={"data": 2}), shape, devices)
    assert [{d.process_index for d in grid[i].ravel()} for i in range(2)] == [{0}, {1}]


def test_hybrid_mesh_errors():
    shape = {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
    with pytest.raises(ValueError, match=r"mesh.fsdp=4 is not divisible by mesh.dcn.fsdp=3"):
        hybrid_devices(MeshConfig(data=2, fsdp=4, dcn={"fsdp": 3}), shape, _fake_devices("slice_index", [4, 4]))
    with pytest.raises(ValueError, match=r"spans 2 slices or processes, but the 8 devices have 1 process_index"):
        make_mesh(MeshConfig(data=2, fsdp=4, dcn={"data": 2}))  # 8 devices of this one process
    with pytest.raises(ValueError, match=r"each of the 2 slice_index groups needs 4 devices.*\[2, 6\]"):
        hybrid_devices(MeshConfig(data=2, fsdp=4, dcn={"data": 2}), shape, _fake_devices("slice_index", [2, 6]))
    with pytest.raises(ValueError, match="greater than 0"):
        MeshConfig(dcn={"data": 0})
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, dcn={"data": 1}))  # dcn of 1: the jax.make_mesh layout
    assert list(mesh.devices.ravel()) == jax.devices()
