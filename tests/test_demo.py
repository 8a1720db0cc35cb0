"""The digits demo (``ntfast.demo``): accuracy well above chance, resumable blocked kernels, CLI."""

import jax
import numpy as np
import pytest

from ntfast import demo

# Tiny setting: 40 + 40 images in 20×20 blocks -> 3 train blocks (upper triangle) + 4 test blocks.
TINY = {"n_train": 40, "n_test": 40, "depth": 5, "seed": 0, "block": 20, "diag_reg": 1e-4}
TINY_ARGS = ["--n-train", "40", "--n-test", "40", "--depth", "5", "--seed", "0", "--block", "20"]
N_BLOCKS = 7


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One uninterrupted tiny run, its cache file kept for the CLI tests."""
    cache = str(tmp_path_factory.mktemp("demo") / "full.npz")
    lines = []
    result = demo.run(**TINY, cache=cache, progress=False, out=lines.append)
    return result, cache, lines


def test_accuracy_well_above_chance(full):
    result, _, lines = full
    acc = result["accuracy"]
    # Chance is 10%; the tiny run gets ~85% for both kernels.
    assert acc["nngp"] >= 0.6, acc
    assert acc["ntk"] >= 0.6, acc
    run = result["run"]
    assert run.complete
    assert (run.blocks_total, run.blocks_computed, run.blocks_cached) == (N_BLOCKS, N_BLOCKS, 0)
    text = "\n".join(lines)
    assert "Myrtle-5" in text and "NNGP" in text and "NTK" in text and "linear" in text


def test_kernels_are_sane(full):
    k = full[0]["run"].kernels
    for kind in demo.KINDS:
        train, test = k[f"train_{kind}"], k[f"test_{kind}"]
        assert train.shape == (40, 40) and test.shape == (40, 40)
        assert np.all(np.isfinite(train)) and np.all(np.isfinite(test))
        # Mirrored from the upper triangle blocks: exactly symmetric, positive diagonal.
        np.testing.assert_array_equal(train, train.T)
        assert np.all(np.diag(train) > 0)
        # No block left at its zero initial value.
        assert np.all(train != 0) and np.all(test != 0)
    # The NTK dominates the NNGP (Θ = K + positive terms) for ReLU nets.
    assert np.all(np.diag(k["train_ntk"]) > np.diag(k["train_nngp"]))


def test_resume_from_cache_gives_identical_kernels(full, tmp_path):
    cache = str(tmp_path / "part.npz")
    first = demo.run(**TINY, cache=cache, progress=False, stop_after=3, out=lambda s: None)
    assert not first["run"].complete
    assert first["accuracy"]["nngp"] is None and first["accuracy"]["ntk"] is None
    with np.load(cache) as data:
        assert data["done"].shape == (3, 3)

    second = demo.run(**TINY, cache=cache, progress=False, out=lambda s: None)
    run = second["run"]
    assert run.complete
    assert (run.blocks_cached, run.blocks_computed) == (3, N_BLOCKS - 3)
    for key, value in full[0]["run"].kernels.items():
        np.testing.assert_array_equal(run.kernels[key], value, err_msg=key)
    assert second["accuracy"] == full[0]["accuracy"]


def test_cli_reads_complete_cache(full, capsys):
    _, cache, _ = full
    assert demo.main([*TINY_ARGS, "--cache", cache, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{N_BLOCKS} of {N_BLOCKS} blocks from the cache" in out
    acc = full[0]["accuracy"]
    assert f"NNGP              {acc['nngp']:.1%}" in out
    assert f"NTK               {acc['ntk']:.1%}" in out


def test_cli_rejects_cache_of_other_computation(full, capsys):
    _, cache, _ = full
    other = [a if a != "0" else "1" for a in TINY_ARGS]  # seed 1: another split
    assert demo.main([*other, "--cache", cache, "--no-progress"]) == 2
    assert "different computation" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--n-train", "0"])
    assert "--n-train must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--depth", "6"])


def test_split_and_network_validation():
    with pytest.raises(ValueError, match="n_train"):
        demo.load_digits_split(1500, 400, 0)
    with pytest.raises(ValueError, match="depth"):
        demo.myrtle_network(None, depth=6)
    split = demo.load_digits_split(30, 20, 3)
    assert split.x_train.shape == (30, 8, 8, 1) and split.x_train.dtype == np.float32
    assert not set(map(bytes, split.x_train)) & set(map(bytes, split.x_test))
    assert abs(float(split.x_train.mean())) < 1e-5 and abs(float(split.x_train.std()) - 1) < 1e-5


def test_block_plan_covers_every_entry_once():
    n_train, n_test, block = 23, 11, 5
    plan = demo.block_plan(n_train, n_test, block)
    cover = {"train": np.zeros((n_train, n_train), int), "test": np.zeros((n_test, n_train), int)}
    for part, i, j in plan:
        cover[part][i * block : (i + 1) * block, j * block : (j + 1) * block] += 1
        if part == "train" and i != j:
            cover[part][j * block : (j + 1) * block, i * block : (i + 1) * block] += 1
    assert np.all(cover["train"] == 1) and np.all(cover["test"] == 1)


def test_network_matches_neural_tangents():
    """The demo's Myrtle-5 through ntfast equals the same network through NT 0.6.5 (f64)."""
    from nt_oracle import load_nt_stax

    import ntfast.stax

    x = demo.load_digits_split(3, 2, 0)
    x1, x2 = x.x_train.astype(np.float64), x.x_test.astype(np.float64)

    def kernels(stax):
        kernel_fn = demo.myrtle_network(stax, 5)[1][2]
        # Jitted: op-by-op NT on this network takes minutes.
        return jax.jit(lambda a, b: tuple(kernel_fn(a, b, get=("nngp", "ntk"))))(x1, x2)

    got, want = kernels(ntfast.stax), kernels(load_nt_stax())
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert np.max(np.abs(g - w)) <= 1e-6 * np.max(np.abs(w))


def _linear_kernel_fn(x1, x2, get):
    """Stand-in kernel_fn (cheap to compile): NNGP = x1·x2ᵀ / d, NTK = 2·NNGP."""
    f1, f2 = x1.reshape(len(x1), -1), x2.reshape(len(x2), -1)
    nngp = f1 @ f2.T / f1.shape[1]
    return {"nngp": nngp, "ntk": 2 * nngp}[get[0]], {"nngp": nngp, "ntk": 2 * nngp}[get[1]]


def test_ctrl_c_keeps_finished_blocks(tmp_path, monkeypatch):
    """A KeyboardInterrupt mid-run saves every finished block; the rerun computes only the rest."""
    split = demo.load_digits_split(12, 7, 0)
    cache = str(tmp_path / "c.npz")
    kwargs = {"block": 5, "cache": cache, "fp": "linear", "progress": False}
    real_block_until_ready = jax.block_until_ready
    calls = []

    def interrupt_on_third(x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_block_until_ready(x)

    monkeypatch.setattr(jax, "block_until_ready", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        demo.compute_kernels(_linear_kernel_fn, split.x_train, split.x_test, **kwargs)
    monkeypatch.setattr(jax, "block_until_ready", real_block_until_ready)
    with np.load(cache) as data:
        assert data["done"].tolist() == [[0, 0, 0], [0, 0, 1]]

    # save_every_s=inf: only the final save, which must still hold everything.
    resumed = demo.compute_kernels(
        _linear_kernel_fn, split.x_train, split.x_test, **kwargs, save_every_s=float("inf")
    )
    total = len(demo.block_plan(12, 7, 5))
    assert (resumed.blocks_cached, resumed.blocks_computed, resumed.complete) == (
        2,
        total - 2,
        True,
    )
    f_train = split.x_train.reshape(12, -1).astype(np.float64)
    f_test = split.x_test.reshape(7, -1).astype(np.float64)
    want = f_train @ f_train.T / 64
    np.testing.assert_allclose(resumed.kernels["train_nngp"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        resumed.kernels["test_ntk"], 2 * f_test @ f_train.T / 64, rtol=1e-5, atol=1e-6
    )
    with np.load(cache) as data:
        assert len(data["done"]) == total
        np.testing.assert_array_equal(data["train_ntk"], resumed.kernels["train_ntk"])
