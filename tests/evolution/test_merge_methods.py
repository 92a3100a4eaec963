"""Each merge method against hand-computed expectations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from evolution import UnknownNameError
from evolution.merge_methods import MergeMethod, MergeParams, get_method, known_methods, register
from evolution.merge_methods._sparsify import generator, keep_count, trim_magnitude_

T = torch.tensor
ALL = ["breadcrumbs", "dare_linear", "dare_ties", "linear", "slerp", "task_arithmetic", "ties"]


def params(n: int, *, weights=None, densities=None, gammas=None, seed=0, **options) -> MergeParams:
    return MergeParams(
        weights=tuple(weights or (1.0,) * n),
        densities=tuple(densities or (1.0,) * n),
        gammas=tuple(gammas or (0.0,) * n),
        options=options,
        seed=seed,
    )


def run(method: str, base, tensors, p: MergeParams) -> torch.Tensor:
    return get_method(method).merge_tensor("model.layers.0.w", base, tensors, p)


# ----------------------------------------------------------------------------- registry


def test_registry_knows_every_method_sorted() -> None:
    assert known_methods() == ALL
    assert all(isinstance(get_method(n), MergeMethod) and get_method(n).name == n for n in ALL)


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_method("tie")
    for name in ALL:
        assert name in str(info.value)
    assert info.value.known == ALL


def test_register_refuses_a_second_class_under_a_taken_name() -> None:
    class Other(MergeMethod):
        name = "linear"

        def merge_tensor(self, name, base, tensors, params):  # type: ignore[no-untyped-def]
            return tensors[0]

    with pytest.raises(ValueError, match="already registered"):
        register(Other)
    assert type(get_method("linear")).__name__ == "Linear"


# ----------------------------------------------------------------------------- linear


def test_linear_normalises_weights_by_their_sum() -> None:
    a, b = T([4.0, 0.0]), T([0.0, 8.0])
    assert torch.equal(run("linear", None, [a, b], params(2, weights=(3.0, 1.0))), T([3.0, 2.0]))


def test_linear_without_normalize_is_the_weighted_sum() -> None:
    a, b = T([4.0, 0.0]), T([0.0, 8.0])
    out = run("linear", None, [a, b], params(2, weights=(3.0, 1.0), normalize=False))
    assert torch.equal(out, T([12.0, 8.0]))


def test_linear_refuses_zero_weight_sum_when_normalising() -> None:
    with pytest.raises(ValueError, match="non-zero sum"):
        get_method("linear").check(params(2, weights=(1.0, -1.0)))
    get_method("linear").check(params(2, weights=(1.0, -1.0), normalize=False))


# ----------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_adds_scaled_task_vectors() -> None:
    base, a, b = T([1.0, 1.0]), T([2.0, 0.0]), T([1.0, 3.0])
    # tau_a = [1, -1], tau_b = [0, 2]; 1*tau_a + 0.5*tau_b = [1, 0]; base + 2 * [1, 0]
    out = run("task_arithmetic", base, [a, b], params(2, weights=(1.0, 0.5), **{"lambda": 2.0}))
    torch.testing.assert_close(out, T([3.0, 1.0]))


def test_task_arithmetic_negative_weight_subtracts_a_task() -> None:
    base, a = T([1.0]), T([3.0])
    torch.testing.assert_close(
        run("task_arithmetic", base, [a], params(1, weights=(-1.0,))), T([-1.0])
    )


# ----------------------------------------------------------------------------- TIES


def test_ties_trims_elects_sign_and_takes_the_disjoint_mean() -> None:
    base = torch.zeros(5)
    a = T([4.0, -1.0, 0.5, -3.0, 2.0])  # top-2 kept: 4, -3
    b = T([-2.0, 5.0, -1.0, 1.0, 0.1])  # top-2 kept: -2, 5
    c = T([1.0, -6.0, 3.0, 2.0, -0.5])  # top-2 kept: -6, 3
    # trimmed sums [2, -1, 3, -3, 0] -> signs [+, -, +, -, 0]; only agreeing entries averaged
    out = run("ties", base, [a, b, c], params(3, densities=(0.4, 0.4, 0.4)))
    torch.testing.assert_close(out, T([4.0, -6.0, 3.0, -3.0, 0.0]))


def test_ties_divisor_counts_agreeing_nonzero_entries_only() -> None:
    base = T([10.0, 10.0])
    a, b, c = T([12.0, 12.0]), T([14.0, 14.0]), T([10.0, 9.0])  # tau: [2,2], [4,4], [0,-1]
    out = run("ties", base, [a, b, c], params(3))
    # entry 0: c's zero does not count (mean of 2 and 4, not 6/3); entry 1: c disagrees
    torch.testing.assert_close(out, T([13.0, 13.0]))


def test_ties_weighted_mean_lambda_and_plain_sum() -> None:
    base, a, b = T([0.0]), T([2.0]), T([4.0])
    torch.testing.assert_close(run("ties", base, [a, b], params(2, weights=(1.0, 3.0))), T([3.5]))
    torch.testing.assert_close(run("ties", base, [a, b], params(2, **{"lambda": 0.5})), T([1.5]))
    torch.testing.assert_close(run("ties", base, [a, b], params(2, normalize=False)), T([6.0]))


def test_ties_exact_sign_cancellation_keeps_the_base() -> None:
    base, a, b = T([1.0]), T([3.0]), T([-1.0])
    torch.testing.assert_close(run("ties", base, [a, b], params(2)), T([1.0]))


def test_ties_refuses_non_positive_weights() -> None:
    with pytest.raises(ValueError, match="positive"):
        get_method("ties").check(params(2, weights=(1.0, 0.0)))


def test_trim_keeps_round_density_times_numel_but_at_least_one() -> None:
    assert keep_count(0.2, 10) == 2 and keep_count(0.01, 10) == 1 and keep_count(1.0, 3) == 3
    x = torch.arange(1.0, 101.0) * torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0)
    kept = trim_magnitude_(x, 0.2)
    assert int((kept != 0).sum()) == 20 and kept.abs()[kept != 0].min() == 81


# ----------------------------------------------------------------------------- DARE


def test_dare_keeps_density_fraction_and_rescales_by_inverse() -> None:
    base, tau = torch.zeros(200_000), torch.ones(200_000)
    out = run("dare_linear", base, [tau], params(1, densities=(0.3,)))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    torch.testing.assert_close(out[kept], torch.full((int(kept.sum()),), 1 / 0.3))
    assert abs(out.mean().item() - 1.0) < 0.02  # 1/(1-p) keeps the expectation
    plain = run("dare_linear", base, [tau], params(1, densities=(0.3,), rescale=False))
    assert set(plain.unique().tolist()) == {0.0, 1.0}


def test_dare_masks_are_seeded_by_seed_and_tensor_name_only() -> None:
    base, a, b = torch.zeros(1000), torch.ones(1000), 2 * torch.ones(1000)
    method = get_method("dare_ties")
    p = params(2, densities=(0.5, 0.5), seed=7)
    first = method.merge_tensor("x", base, [a, b], p)
    rng = torch.get_rng_state()
    torch.manual_seed(12345)  # the global RNG plays no part
    method.merge_tensor("y", base, [a, b], p)  # merging another tensor first changes nothing
    again = method.merge_tensor("x", base, [a, b], p)
    torch.set_rng_state(rng)
    assert torch.equal(first, again)
    assert not torch.equal(first, method.merge_tensor("y", base, [a, b], p))
    assert not torch.equal(
        first, method.merge_tensor("x", base, [a, b], params(2, densities=(0.5, 0.5), seed=8))
    )


def test_dare_models_get_independent_masks() -> None:
    gen_a, gen_b = generator(0, "x", 0), generator(0, "x", 1)
    assert not torch.equal(torch.rand(64, generator=gen_a), torch.rand(64, generator=gen_b))


def test_dare_does_not_touch_the_global_rng() -> None:
    state = torch.get_rng_state()
    run("dare_linear", torch.zeros(10), [torch.ones(10)], params(1, densities=(0.5,)))
    assert torch.equal(state, torch.get_rng_state())


def test_dare_with_density_one_equals_the_undropped_methods() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=gen)
    models = [base + torch.randn(50, generator=gen) for _ in range(3)]
    p = params(3, weights=(1.0, 0.5, 2.0))
    torch.testing.assert_close(
        run("dare_linear", base, models, p), run("task_arithmetic", base, models, p)
    )
    torch.testing.assert_close(run("dare_ties", base, models, p), run("ties", base, models, p))


def test_dare_ties_disjoint_mean_after_rescale() -> None:
    # density 1 (no drop): tau = [1, 1] and [3, -4]; signs [+, -]; mean [2, -4]
    out = run("dare_ties", torch.zeros(2), [T([1.0, 1.0]), T([3.0, -4.0])], params(2))
    torch.testing.assert_close(out, T([2.0, -4.0]))


# ----------------------------------------------------------------------------- SLERP


def test_slerp_endpoints_midpoint_and_angle() -> None:
    v0, v1 = T([2.0, 0.0]), T([0.0, 2.0])
    assert torch.equal(run("slerp", None, [v0, v1], params(2, t=0.0)), v0)
    torch.testing.assert_close(run("slerp", None, [v0, v1], params(2, t=1.0)), v1)
    r = math.sqrt(2.0)
    torch.testing.assert_close(run("slerp", None, [v0, v1], params(2, t=0.5)), T([r, r]))
    # 60 degrees apart, halfway is 30 degrees from each, on the unit circle
    w1 = T([0.5, math.sqrt(3) / 2])
    out = run("slerp", None, [T([1.0, 0.0]), w1], params(2, t=0.5))
    torch.testing.assert_close(out, T([math.sqrt(3) / 2, 0.5]))


def test_slerp_falls_back_to_lerp_for_near_parallel_vectors() -> None:
    v0 = T([1.0, 2.0, 3.0])
    torch.testing.assert_close(
        run("slerp", None, [v0, 2 * v0], params(2, t=0.25)), T([1.25, 2.5, 3.75])
    )
    near = v0 + T([0.0, 0.0, 0.05])  # cos = 0.99987 > 0.9995
    lerp = torch.lerp(v0, near, 0.3)
    assert torch.equal(run("slerp", None, [v0, near], params(2, t=0.3)), lerp)
    exact = run("slerp", None, [v0, near], params(2, t=0.3, dot_threshold=1.0))
    assert not torch.equal(exact, lerp)  # a real slerp differs (slightly) from the fallback
    torch.testing.assert_close(exact, lerp, atol=1e-3, rtol=0)
    assert torch.equal(
        run("slerp", None, [v0, -v0], params(2, t=0.5)), torch.zeros(3)
    )  # anti-parallel
    assert torch.equal(run("slerp", None, [torch.zeros(3), v0], params(2, t=0.5)), v0 / 2)  # zero


# ----------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_drops_both_tails_in_the_given_fractions() -> None:
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.randperm(1000, generator=gen).float() + 1.0  # 1..1000, shuffled
    tau = magnitudes * torch.where(torch.rand(1000, generator=gen) < 0.5, -1.0, 1.0)
    out = run("breadcrumbs", torch.zeros(1000), [tau], params(1, densities=(0.5,), gammas=(0.1,)))
    kept = out != 0
    assert int(kept.sum()) == 500  # density
    assert (
        int((magnitudes > 900).sum()) == 100 and not kept[magnitudes > 900].any()
    )  # gamma: top 10%
    assert not kept[magnitudes <= 400].any()  # beta = 1 - 0.5 - 0.1: bottom 40%
    assert kept[(magnitudes > 400) & (magnitudes <= 900)].all()
    assert torch.equal(out[kept], tau[kept])


def test_breadcrumbs_sums_masked_task_vectors_with_weights_and_lambda() -> None:
    base = T([1.0, 1.0, 1.0, 1.0, 1.0])
    a = base + T([1.0, -2.0, 3.0, -4.0, 5.0])  # keeps 3, -4
    b = base + T([5.0, 4.0, 3.0, 2.0, 1.0])  # keeps 4, 3
    p = params(2, weights=(1.0, 0.5), densities=(0.4, 0.4), gammas=(0.2, 0.2), **{"lambda": 2.0})
    expected = base + 2.0 * (T([0.0, 0.0, 3.0, -4.0, 0.0]) + 0.5 * T([0.0, 4.0, 3.0, 0.0, 0.0]))
    torch.testing.assert_close(run("breadcrumbs", base, [a, b], p), expected)


def test_breadcrumbs_refuses_density_plus_gamma_above_one() -> None:
    with pytest.raises(ValueError, match="density \\+ gamma"):
        get_method("breadcrumbs").check(params(1, densities=(0.95,), gammas=(0.1,)))


# ----------------------------------------------------------------------------- common contract


@pytest.mark.parametrize("name", ALL)
def test_methods_leave_inputs_untouched_and_keep_shape(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=gen)
    models = [base + 0.1 * torch.randn(4, 6, generator=gen) for _ in range(2)]
    copies = [base.clone(), *(m.clone() for m in models)]
    method = get_method(name)
    p = params(2, densities=(0.5, 0.5), gammas=(0.1, 0.1))
    out = method.merge_tensor("w", base if method.needs_base else None, models, p)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(copies, [base, *models]))


@pytest.mark.parametrize("name", [n for n in ALL if n != "slerp"])
def test_methods_of_identical_models_give_that_model(name: str) -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(32, generator=gen)
    model = base + torch.randn(32, generator=gen)
    method = get_method(name)
    if method.needs_base:  # task vectors of one model: a single model at density 1 is itself
        out = method.merge_tensor("w", base, [model], params(1, gammas=(0.0,)))
    else:
        out = method.merge_tensor("w", None, [model, model], params(2))
    torch.testing.assert_close(out, model)


# ----------------------------------------------------------------------------- piece-wise merging


def whole_tensor_formula(method: str, name: str, base, tensors, p: MergeParams) -> torch.Tensor:
    """The methods as they were written before piece-wise merging: one whole tensor at a time."""
    from evolution.merge_methods._sparsify import (
        disjoint_merge_,
        elect_sign,
        random_drop_,
        trim_outliers_,
    )

    lam, normalize = p.number("lambda", 1.0), p.flag("normalize", True)
    if method in ("ties", "dare_ties"):
        deltas = []
        for i, (t, w, d) in enumerate(zip(tensors, p.weights, p.densities)):
            if method == "ties":
                deltas.append(trim_magnitude_(t - base, d).mul_(w))
            else:
                deltas.append(random_drop_(t - base, d, generator(p.seed, name, i)).mul_(w))
        merged = disjoint_merge_(deltas, p.weights, elect_sign(deltas), normalize=normalize)
        return merged.mul_(lam).add_(base)
    if method in ("dare_linear", "breadcrumbs"):
        total = torch.zeros_like(base)
        for i, (t, w, d, g) in enumerate(zip(tensors, p.weights, p.densities, p.gammas)):
            if method == "dare_linear":
                total.add_(random_drop_(t - base, d, generator(p.seed, name, i)), alpha=w)
            else:
                total.add_(trim_outliers_(t - base, d, g), alpha=w)
        return total.mul_(lam).add_(base)
    assert method == "slerp"
    v0, v1 = tensors
    t = p.number("t", 0.5)
    dot = float(torch.dot(v0.reshape(-1), v1.reshape(-1))) / (float(v0.norm()) * float(v1.norm()))
    omega = math.acos(max(-1.0, min(1.0, dot)))
    return torch.add(v0 * (math.sin((1 - t) * omega) / math.sin(omega)), v1,
                     alpha=math.sin(t * omega) / math.sin(omega))  # fmt: skip


def feed_pieces(method: str, name: str, base, tensors, p: MergeParams, piece: int) -> torch.Tensor:
    """What the streaming merge does with one tensor: statistics passes, then the merge pass."""
    m = get_method(method)
    numel = tensors[0].numel()
    merger = m.start(name, tuple(tensors[0].shape), piece, p)
    if piece < numel:
        piece = max(merger.granule, piece // merger.granule * merger.granule)
    runs = [(s, min(s + piece, numel)) for s in range(0, numel, piece)]
    flat = [t.reshape(-1) for t in tensors]
    flat_base = None if base is None else base.reshape(-1)

    def cut(s: int, e: int):
        return None if flat_base is None else flat_base[s:e], [t[s:e] for t in flat]

    for pass_index in range(merger.passes):
        for s, e in runs:
            merger.observe(pass_index, s, *cut(s, e))
        merger.end_pass(pass_index)
    out = torch.empty(numel)
    for s, e in runs:
        merger.merge(s, *cut(s, e), out[s:e])
    return out.view(tensors[0].shape)


PIECEWISE = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "slerp"]


@pytest.mark.parametrize("method", PIECEWISE)
def test_piecewise_methods_equal_their_whole_tensor_formulas(method: str) -> None:
    gen = torch.Generator().manual_seed(5)
    shape = (300, 170)  # 51000 entries: several pieces, tiles and SLERP blocks
    base = torch.randn(shape, generator=gen)
    models = [base + torch.randn(shape, generator=gen) * s for s in (0.1, 0.2, 0.05)]
    models[1].view(-1)[:4000] = base.view(-1)[:4000] + 0.125  # many ties at one magnitude
    n = 2 if method == "slerp" else 3
    p = params(n, weights=(1.0, 0.6, 0.3)[:n], densities=(0.5, 0.3, 0.7)[:n],
               gammas=(0.05, 0.1, 0.0)[:n], t=0.3, seed=9)  # fmt: skip
    name = "model.layers.1.mlp.up_proj.weight"
    use_base = None if method == "slerp" else base
    want = whole_tensor_formula(method, name, base, models[:n], p)
    whole = get_method(method).merge_tensor(name, use_base, models[:n], p)
    # slerp: the angle now comes from float64 block sums (the float32 dot product rounded);
    # the others: the same thresholds and masks, the same float ops entry by entry
    torch.testing.assert_close(whole, want, rtol=1e-6, atol=1e-6)
    if method != "slerp":
        assert ((whole == base) == (want == base)).all()  # the same entries kept
    for piece in (1000, 4096 * 3 + 5, 51000, 10**6):
        got = feed_pieces(method, name, use_base, models[:n], p, piece)
        assert torch.equal(got, whole), piece  # bit for bit, whatever the piece size


def test_magnitude_ranks_in_pieces_equal_a_whole_tensor_partition() -> None:
    from evolution.merge_methods._sparsify import MagnitudeRanks

    gen = torch.Generator().manual_seed(1)
    values = torch.randn(100_003, generator=gen).abs()
    values[::7] = 0.5  # ties
    values[:10] = 0.0
    ks = [1, 2, 1000, 50_000, 99_999, 100_003]
    whole = MagnitudeRanks(values.numel(), ks, whole=True)
    whole.whole(values.clone())
    pieces = MagnitudeRanks(values.numel(), ks, whole=False)
    for pass_index in range(pieces.passes):
        for start in range(0, values.numel(), 7777):
            pieces.observe(pass_index, values[start : start + 7777])
        pieces.end_pass(pass_index)
    assert pieces.values == whole.values == [float(values.sort().values[-k]) for k in ks]
    with pytest.raises(ValueError, match="out of range"):
        MagnitudeRanks(10, [11], whole=True)
