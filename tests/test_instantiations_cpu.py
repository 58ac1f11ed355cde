"""The committed kernel instantiation units are what cuda/generate_instantiations.py writes: the
build compiles a Hopper forward for exactly the head dims that have a unit, so a stale or missing
file would change what gets built."""

import importlib.util
import pathlib

CUDA_DIR = pathlib.Path(__file__).resolve().parent.parent / "cuda"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_instantiations",
                                                  CUDA_DIR / "generate_instantiations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_units_match_the_generator():
    expected = load_generator().units()
    committed = {path.name: path.read_text() for path in (CUDA_DIR / "instantiations").glob("*.cu")}
    assert sorted(committed) == sorted(expected)
    for name, text in expected.items():
        assert committed[name] == text, f"cuda/instantiations/{name} differs from the generator's"


def test_hopper_units_only_for_head_dims_with_tiles():
    generator = load_generator()
    traits = (CUDA_DIR / "fwd_sm90_traits.h").read_text()
    for head_dim in generator.SM90_FWD_HEAD_DIMS:
        assert f"struct Sm90FwdTileSize<{head_dim}>" in traits
    assert set(generator.SM90_FWD_HEAD_DIMS) <= set(generator.HEAD_DIMS)
