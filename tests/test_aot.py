"""`codemix aot`: accelerator names, meshes on real TPU topologies, and the compiled step's memory.

Compiling needs libtpu (`pip install -e '.[tpu]'`, part of `make test`); without it these tests are
skipped with that reason. Nothing here runs on a TPU: libtpu describes the topology and compiles.
"""

import itertools
import json
import logging
import pickle

import gin
import numpy as np
import pytest

from codemix_jax import cli, gin_config, sharding, tpu_topology

pytest.importorskip(
    "libtpu", reason="AOT compilation for TPU needs libtpu: pip install -e '.[tpu]'"
)

SMOKE = "gin/experiments/smoke.gin"
SHARDINGS = [
    "gin/sharding/fsdp.gin",
    "gin/sharding/data_parallel.gin",
    "gin/sharding/fsdp_tensor.gin",
]


@pytest.mark.parametrize(
    ("name", "chips", "grid"),
    [
        ("v5e-256", 256, (16, 16)),
        ("v5e-8", 8, (2, 4)),
        ("v6e-64", 64, (8, 8)),
        ("v4-128", 64, (4, 4, 4)),  # v4 and v5p names count TensorCores, two per chip
        ("v5p-512", 256, (4, 8, 8)),
    ],
)
def test_accelerator_names_map_to_chip_grids(name, chips, grid):
    tpu = tpu_topology.tpu_slice(name)
    assert (tpu.chips, tpu.chip_grid) == (chips, grid)
    assert len(tpu.devices()) == chips


@pytest.mark.parametrize(
    ("name", "message"),
    [("v7x-8", "unknown TPU accelerator 'v7x-8'"), ("v5e-3", "no v5e slice of size 3"),
     ("v4-9", "no v4 slice of size 9"), ("tpu-8", "unknown TPU accelerator 'tpu-8'")],
)  # fmt: skip
def test_bad_accelerator_is_named(name, message):
    with pytest.raises(ValueError, match=message):
        tpu_topology.tpu_slice(name)


SLICES = ["v4-16", "v4-64", "v4-512", "v5e-8", "v5e-64", "v5e-256", "v5p-16", "v5p-128", "v5p-512"]


@pytest.mark.parametrize("name", SLICES)
@pytest.mark.parametrize("sharding_file", SHARDINGS)
def test_every_sharding_builds_its_mesh_on_real_topologies(sharding_file, name):
    """8 to 256 chips of v4, v5e and v5p: each mesh uses every chip exactly once."""
    tpu = tpu_topology.tpu_slice(name)
    gin_config.parse([sharding_file])
    mesh = sharding.make_mesh(devices=tpu.devices())
    gin.clear_config()
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in tpu.devices())


def neighbours(a, b, grid) -> bool:
    """One step apart on the torus (wrap-around links included) along exactly one axis."""
    steps = [min(abs(x - y), size - abs(x - y)) for x, y, size in zip(a, b, grid, strict=False)]
    return sorted(steps) == [0] * (len(steps) - 1) + [1]


@pytest.mark.parametrize("name", ["v5e-256", "v4-128", "v5p-64", "v6e-16"])
def test_tensor_axis_rides_on_neighbouring_chips(name):
    """4-way tensor parallelism all-reduces every layer: its 4 chips must be a ring of links."""
    tpu = tpu_topology.tpu_slice(name)
    gin_config.parse([SHARDINGS[2]])
    mesh = sharding.make_mesh(devices=tpu.devices())
    gin.clear_config()
    assert mesh.shape["tensor"] == 4 and mesh.size == tpu.chips
    groups = np.asarray(mesh.devices).reshape(-1, 4)
    for group in groups:
        coords = [device.coords for device in group]
        assert all(neighbours(a, b, tpu.chip_grid) for a, b in itertools.pairwise(coords)), coords


def aot_json(capsys, *args: str) -> dict:
    assert cli.main(["aot", "--gin_file", SMOKE, *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("sharding_file", SHARDINGS)
def test_every_sharding_compiles_on_two_slices(capsys, sharding_file):
    report = aot_json(
        capsys,
        *("--gin_file", sharding_file, "--topology", "v5e-8", "--num_slices", "2"),
        *("--gin_bindings", "MixtureInput.global_batch_size = 64"),
    )
    assert report["fits"] and report["chips"] == 16 and report["mesh"]["data"] >= 2
    assert report["total_bytes"] == (
        report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
        + report["temp_bytes"]
    )  # fmt: skip


def test_compiled_step_is_the_training_step(capsys):
    """With unrolled layers the compiler counts every layer: the step it compiled does the model
    FLOPs that MFU uses (6N + attention, forward and backward) within 25 %. Its donated state is
    params plus two Adam moments, sharded four ways: TPU tiles pad the tiny model's 64-wide rows,
    so up to 2.5 times that, but far from the 4 times that an unsharded state would take."""
    flags = ["--topology", "v5e-4", "--gin_bindings", "ModelConfig.scan_layers = False"]
    report = aot_json(capsys, *flags)
    assert report["compiled_flops"] == pytest.approx(report["model_flops"], rel=0.25)
    state_bytes = 3 * 262_464 * 4 / 4  # f32 params, mu and nu over fsdp=4
    assert state_bytes <= report["alias_bytes"] <= 2.5 * state_bytes


def test_a_step_that_does_not_fit_is_reported_with_its_largest_buffers(capsys, caplog):
    """Paper A's 470M at its own batch and length with dense attention and full logits: the
    TPU compiler's verdict and its biggest allocations, and the knobs that would help."""
    bindings = ["MixtureInput.seq_len = 8192", "MixtureInput.global_batch_size = 512"]
    flags = ["--gin_file", "gin/models/470m.gin", "--topology", "v5e-256"]
    flags += [arg for binding in bindings for arg in ("--gin_bindings", binding)]
    assert cli.main(["aot", "--gin_file", SMOKE, *flags]) == 0
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text
    assert "f32[2,8192,256000]" in text  # the float32 logits
    assert "try: full [b, l, vocab] logits: token_losses.chunk_size" in text
    report = aot_json(capsys, *flags)
    assert not report["fits"] and report["total_bytes"] > report["hbm_bytes"] == 15.75 * 2**30


def test_batch_that_does_not_divide_the_mesh_is_named(caplog):
    with caplog.at_level(logging.ERROR):
        code = cli.main(["aot", "--gin_file", SMOKE, "--topology", "v5e-256"])
    assert code == 2
    assert "global batch size 32 does not divide the data*fsdp mesh size 256" in caplog.text


def test_compiled_step_can_be_saved_and_is_refused_by_other_devices(
    capsys, caplog, local_data, tmp_path
):
    """A v5e-4 step is saved with its signature; training on this CPU host refuses it by name."""
    path = tmp_path / "step.pkl"
    args = ["aot", "--gin_file", SMOKE, "--topology", "v5e-4", "--save_compiled", str(path)]
    assert cli.main(args) == 0
    with open(path, "rb") as f:
        saved = pickle.load(f)
    assert set(saved) == {"executable", "in_tree", "out_tree", "signature"}
    assert len(saved["executable"]) > 10_000  # a real serialized TPU executable
    assert saved["in_tree"].num_leaves > 5  # state and batch leaves
    data = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
    ]
    train = ["train", "--gin_file", SMOKE, "--run_dir", str(tmp_path / "run")]
    train += ["--compiled_step", str(path), *(f for b in data for f in ("--gin_bindings", b))]
    with caplog.at_level(logging.ERROR):
        assert cli.main(train) == 2
    assert "devices: saved 4 tpu devices (TPU v5 lite) vs now 1 cpu devices" in caplog.text
    assert not (tmp_path / "run").exists()


def test_microbatches_reach_the_compiled_step(capsys):
    """The same program as `codemix train`: 4 microbatches hold a quarter of the activations."""
    flags = ["--topology", "v5e-4", "--gin_bindings", "MixtureInput.global_batch_size = 256"]
    whole = aot_json(capsys, *flags)
    quarter = aot_json(capsys, *flags, "--gin_bindings", "train.microbatches = 4")
    assert quarter["temp_bytes"] < 0.5 * whole["temp_bytes"]
