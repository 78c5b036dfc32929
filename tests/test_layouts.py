"""Mesh specs and logical-axis layout rules (no model runs: milliseconds)."""
import jax
import pytest

from orca_jax.models.gpt2 import PARAM_AXES, PRESETS
from orca_jax.sharding.layouts import LAYOUTS, Layout, param_shardings, spec_for
from orca_jax.sharding.mesh import make_mesh, parse_mesh_spec


def test_parse_mesh_spec():
    assert parse_mesh_spec("data=1, tensor=4,pipeline=1") == {"data": 1, "tensor": 4, "pipeline": 1}
    assert parse_mesh_spec({"tensor": 2}) == {"tensor": 2}
    for bad, match in [("tensor", "name=size"), ("tensor=x", "name=size"), ("", "empty"),
                       ("a=1,a=2", "given twice"), ("tensor=0", ">= 1"), ("1x=2", "identifier")]:
        with pytest.raises(ValueError, match=match):
            parse_mesh_spec(bad)


def test_make_mesh_uses_first_devices_and_auto_axes():
    mesh = make_mesh("data=2,tensor=2")
    assert mesh.shape == {"data": 2, "tensor": 2}
    assert list(mesh.devices.flat) == jax.devices()[:4]
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
    with pytest.raises(ValueError, match="needs 16 devices but only 8"):
        make_mesh("tensor=16")


def test_spec_for_rules():
    mesh = make_mesh("data=2,tensor=4,pipeline=1")
    meg = LAYOUTS["megatron"]
    assert spec_for(("layers", "embed", "mlp"), meg, mesh) == jax.P(None, None, "tensor")
    # One mesh axis at most once per array: the first dimension asking gets it.
    assert spec_for(("heads", "mlp"), meg, mesh) == jax.P("tensor", None)
    # Axes of size 1 or absent from the mesh mean replicated.
    odd = Layout("odd", (("embed", "pipeline"), ("mlp", "expert"), ("vocab", "data")))
    assert spec_for(("vocab", "embed", "mlp"), odd, mesh) == jax.P("data", None, None)
    assert spec_for(("heads",), "replicated", mesh) == jax.P(None)
    with pytest.raises(ValueError, match="unknown layout 'nope'"):
        spec_for(("heads",), "nope", mesh)


def test_param_shardings_cover_every_param():
    mesh = make_mesh("tensor=4")
    config = PRESETS["gpt2-tiny"]
    shardings = param_shardings(config, mesh, "megatron")
    assert jax.tree.structure(shardings) == jax.tree.structure(
        PARAM_AXES, is_leaf=lambda x: isinstance(x, tuple))
    assert shardings["h"]["mlp"]["c_proj"]["kernel"].spec == jax.P(None, "tensor", None)
    assert shardings["wte"]["embedding"].spec == jax.P("tensor", None)
    assert shardings["ln_f"]["scale"].spec == jax.P(None)
