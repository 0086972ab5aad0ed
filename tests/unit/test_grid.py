"""Rank layout (gigatron/core/parallel/grid.py) against closed-form formulas and Megatron's
documented assignments, for every world size up to 64."""

import itertools

import pytest

from gigatron.core.parallel.grid import generate_rank_groups, rank_coordinates

SIZES = (1, 2, 3, 4, 8)
ALL_KEYS = {"tp", "pp", "dp", "cp", "ep", "dp_cp", "mp", "tp_pp", "tp_dp_cp", "tp_dp", "tp_cp",
            "embd", "pos_embd", "expt_tp", "expt_dp", "tp_ep", "tp_ep_pp"}


def layouts(max_world=64):
    for world in range(1, max_world + 1):
        for tp, pp, cp in itertools.product(SIZES, repeat=3):
            if world % (tp * pp * cp):
                continue
            for ep, etp in itertools.product((1, 2, 4), (None, 1, 2)):
                e_tp = tp if etp is None else etp
                if world % (e_tp * ep * pp):
                    continue
                yield world, tp, pp, cp, ep, etp


def dense_rank(tp, cp, dp, t, c, d, p):
    return t + tp * (c + cp * (d + dp * p))


def expected_dense(world, tp, pp, cp):
    dp = world // (tp * pp * cp)
    r = lambda t, c, d, p: dense_rank(tp, cp, dp, t, c, d, p)  # noqa: E731
    T, C, D, P = range(tp), range(cp), range(dp), range(pp)
    return {
        "tp": [[r(t, c, d, p) for t in T] for p in P for d in D for c in C],
        "cp": [[r(t, c, d, p) for c in C] for p in P for d in D for t in T],
        "dp": [[r(t, c, d, p) for d in D] for p in P for c in C for t in T],
        "pp": [[r(t, c, d, p) for p in P] for d in D for c in C for t in T],
        "dp_cp": [[r(t, c, d, p) for d in D for c in C] for p in P for t in T],
        "mp": [[r(t, c, d, p) for p in P for t in T] for d in D for c in C],
        "tp_dp_cp": [[r(t, c, d, p) for d in D for c in C for t in T] for p in P],
        "tp_dp": [[r(t, c, d, p) for d in D for t in T] for p in P for c in C],
        "tp_cp": [[r(t, c, d, p) for c in C for t in T] for p in P for d in D],
    }


def expected_expert(world, etp, ep, pp):
    edp = world // (etp * ep * pp)
    r = lambda t, e, d, p: t + etp * (e + ep * (d + edp * p))  # noqa: E731
    T, E, D, P = range(etp), range(ep), range(edp), range(pp)
    return {
        "expt_tp": [[r(t, e, d, p) for t in T] for p in P for d in D for e in E],
        "ep": [[r(t, e, d, p) for e in E] for p in P for d in D for t in T],
        "expt_dp": [[r(t, e, d, p) for d in D] for p in P for e in E for t in T],
        "tp_ep": [[r(t, e, d, p) for e in E for t in T] for p in P for d in D],
        "tp_ep_pp": [[r(t, e, d, p) for p in P for e in E for t in T] for d in D],
    }


def test_every_layout_up_to_64_ranks():
    checked = 0
    for world, tp, pp, cp, ep, etp in layouts():
        groups = generate_rank_groups(world, tp, pp, cp=cp, ep=ep, etp=etp)
        assert set(groups) == ALL_KEYS
        for key, lists in groups.items():
            if key in ("embd", "pos_embd"):
                continue
            flat = sorted(r for g in lists for r in g)
            assert flat == list(range(world)), (key, world, tp, pp, cp, ep, etp)
            assert len({len(g) for g in lists}) == 1
        e_tp = tp if etp is None else etp
        expected = {**expected_dense(world, tp, pp, cp), **expected_expert(world, e_tp, ep, pp)}
        for key, value in expected.items():
            assert groups[key] == value, (key, world, tp, pp, cp, ep, etp)
        assert groups["tp_pp"] == groups["mp"]
        # Pipeline groups coincide between the dense and expert layouts.
        for g in groups["pp"]:
            assert len({r % (world // pp) for r in g}) == 1
        checked += 1
    assert checked > 1000


def test_group_sizes():
    g = generate_rank_groups(48, tp=2, pp=3, cp=2, ep=4, etp=1)
    sizes = {k: len(v[0]) for k, v in g.items()}
    assert sizes == {"tp": 2, "pp": 3, "dp": 4, "cp": 2, "dp_cp": 8, "mp": 6, "tp_pp": 6, "tp_dp_cp": 16,
                     "tp_dp": 8, "tp_cp": 4, "embd": 2, "pos_embd": 1, "ep": 4, "expt_tp": 1,
                     "expt_dp": 4, "tp_ep": 4, "tp_ep_pp": 12}


def test_rank_formula_and_coordinates():
    tp, cp, pp, world = 2, 2, 2, 24
    dp = world // (tp * cp * pp)
    for rank in range(world):
        c = rank_coordinates(rank, {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp}, "tp-cp-ep-dp-pp")
        assert rank == c["tp"] + tp * (c["cp"] + cp * (c["dp"] + dp * c["pp"]))
        groups = generate_rank_groups(world, tp, pp, cp=cp)
        tp_group = next(g for g in groups["tp"] if rank in g)
        assert tp_group.index(rank) == c["tp"]
        dp_group = next(g for g in groups["dp"] if rank in g)
        assert dp_group.index(rank) == c["dp"]
        pp_group = next(g for g in groups["pp"] if rank in g)
        assert pp_group.index(rank) == c["pp"]


def test_reference_example_tp_pp_dp_order():
    # REFERENCE.md: order tp-pp-dp, 8 GPUs, tp=pp=dp=2 -> dp groups [[0,4],[1,5],[2,6],[3,7]].
    g = generate_rank_groups(8, tp=2, pp=2, order="tp-pp-dp")
    assert g["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["pp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    # --use-tp-pp-dp-mapping order: rank = tp_rank + tp * (pp_rank + pp * dp_rank)
    g = generate_rank_groups(16, tp=2, pp=4, order="tp-cp-ep-pp-dp")
    for d in range(2):
        for t in range(2):
            assert [t + 2 * (p + 4 * d) for p in range(4)] in g["pp"]


def test_megatron_docstring_example_16_ranks_tp2_pp4():
    # Megatron's initialize_model_parallel docstring: 16 GPUs, tp=2, pp=4 (dp=2).
    g = generate_rank_groups(16, tp=2, pp=4)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert g["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert g["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert g["embd"] == [[0, 12], [1, 13], [2, 14], [3, 15]]
    assert g["pos_embd"] == [[0], [1], [2], [3]]
    assert g["mp"] == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]


def test_context_and_expert_hand_checked():
    g = generate_rank_groups(8, tp=2, pp=1, cp=2)
    assert g["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["tp_cp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["embd"] == [[r] for r in range(8)]
    # MoE folding: tp=2 for dense layers, experts with etp=1 and ep=4 on the same 8 ranks.
    g = generate_rank_groups(8, tp=2, pp=1, ep=4, etp=1)
    assert g["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["expt_dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["expt_tp"] == [[r] for r in range(8)]
    g = generate_rank_groups(8, tp=2, pp=2, ep=2)
    assert g["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["tp_ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["expt_dp"] == [[r] for r in range(8)]


@pytest.mark.parametrize("args, flag", [
    ((6, 4, 1), "--tensor-model-parallel-size"),
    ((8, 2, 3), "--pipeline-model-parallel-size"),
    ((8, 1, 1, 3), "--context-parallel-size"),
    ((8, 2, 1, 1, 3), "--expert-model-parallel-size"),
    ((8, 2, 1, 1, 2, 3), "--expert-tensor-parallel-size"),
    ((8, 0, 1), "--tensor-model-parallel-size"),
])
def test_sizes_that_do_not_divide_raise(args, flag):
    with pytest.raises(ValueError, match=flag):
        generate_rank_groups(*args)


def test_bad_order_raises():
    with pytest.raises(ValueError, match="unknown"):
        generate_rank_groups(8, 2, 2, order="tp-xx-dp")
    with pytest.raises(ValueError, match="does not mention 'cp'"):
        generate_rank_groups(8, 2, 2, cp=2, order="tp-pp-dp")
    with pytest.raises(ValueError, match="twice"):
        generate_rank_groups(8, 2, 2, order="tp-tp-dp")
