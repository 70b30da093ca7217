"""The convergence criterion: its arithmetic, the in-run check from snapshots, the doubling study."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from paperlib.metrics.consistency import pw_mcc
from paperlib.runs.convergence import (
    Convergence,
    StudyPoint,
    decoder_cosine_to_init,
    doubling_study,
    last_doubling,
    logged_doubling,
    not_converged,
    report,
    study_convergence,
    study_doublings,
)
from paperlib.runs.trained import trained_bank
from paperlib.runs.zoo import llm_schedule
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, train
from paperlib.store import Store


@pytest.mark.parametrize(
    "pw,fvu,expected",
    [
        ((0.700, 0.709), (0.200, 0.1981), True),  # +0.009, -0.95 %
        ((0.700, 0.711), (0.200, 0.200), False),  # PW-MCC moved by 0.011
        ((0.700, 0.689), (0.200, 0.200), False),  # a fall counts as much as a rise
        ((0.700, 0.700), (0.200, 0.1979), False),  # FVU fell by 1.05 %
        ((0.700, 0.700), (0.200, 0.2021), False),  # FVU rose by 1.05 %
    ],
)
def test_the_criterion_is_an_absolute_pw_mcc_and_a_relative_fvu_change(pw, fvu, expected):
    report = Convergence((1000, 2000), pw, fvu)
    assert report.converged is expected
    assert report.pw_mcc_change == pytest.approx(pw[1] - pw[0])
    assert report.fvu_change == pytest.approx((fvu[1] - fvu[0]) / fvu[0])
    record = report.as_dict()
    assert record["converged"] is expected and record["tokens"] == (1000, 2000)
    assert ("NOT converged" in str(report)) is not expected


def test_tolerances_are_parameters():
    report = Convergence((1, 2), (0.5, 0.52), (1.0, 0.97), pw_mcc_tolerance=0.05, fvu_tolerance=0.05)
    assert report.converged
    assert not_converged({"a": report, "b": replace(report, pw_mcc_tolerance=0.01)}) == ["b"]


def data():
    return torch.randn(1024, 8, generator=torch.Generator().manual_seed(0))


def test_last_doubling_reads_the_half_way_snapshot_and_fvu(tmp_path):
    schedule = llm_schedule(steps=20, lr=1e-2, batch_size=64, seed=0, eval_rows=256, warmup_steps=2)
    run = trained_bank(
        data, "gaussian", SAEConfig("topk", 8, 16, k=2, n_seeds=2), schedule, store=Store(tmp_path), progress=False
    )
    report = last_doubling(run, schedule)
    steps = list(run.history["step"])
    assert steps == [0, 10, 20]
    assert report.tokens == (640, 1280)
    assert report.pw_mcc == (pw_mcc(run.checkpoints[10]).mean, pw_mcc(run.checkpoints[20]).mean)
    assert report.fvu == (float(run.history["fvu"][1].mean()), float(run.history["fvu"][2].mean()))


def test_logged_doubling_reads_the_callbacks_pw_mcc_at_half_the_last_step():
    bank = SAEBank(SAEConfig("topk", 8, 16, k=2, n_seeds=3))
    schedule = TrainConfig(steps=40, lr=1e-2, batch_size=64, log_every=10, eval_rows=256)
    history = train(
        bank,
        data(),
        schedule,
        progress=False,
        callbacks={"pw_mcc": lambda b: [p[2] for p in pw_mcc(b.decoder_directions()).pairs]},
    )
    report = logged_doubling(history.columns, rows_per_step=64)
    assert report.tokens == (20 * 64, 40 * 64)
    assert report.pw_mcc == (float(np.mean(history["pw_mcc"][2])), float(np.mean(history["pw_mcc"][4])))
    assert report.pw_mcc[1] == pytest.approx(pw_mcc(bank.decoder_directions()).mean)
    assert report.fvu == (float(history["fvu"][2].mean()), float(history["fvu"][4].mean()))


def test_logged_doubling_without_pw_mcc_judges_fvu_alone():
    columns = {"step": np.array([0, 5, 10]), "fvu": np.array([[1.0], [0.5], [0.499]])}
    report = logged_doubling(columns, rows_per_step=2)
    assert report.pw_mcc is None and report.tokens == (10, 20) and report.converged


@pytest.mark.parametrize("steps", [[0, 4, 10], [0, 3]])
def test_logged_doubling_refuses_a_history_without_the_half_way_step(steps):
    columns = {"step": np.array(steps), "fvu": np.ones((len(steps), 1))}
    with pytest.raises(ValueError, match="log_every that divides steps / 2"):
        logged_doubling(columns, rows_per_step=1)


def test_last_doubling_refuses_a_run_without_the_records(tmp_path):
    schedule = llm_schedule(steps=20, lr=1e-2, batch_size=64, seed=0, eval_rows=256, warmup_steps=2)
    bare = replace(schedule, log_every=20, checkpoint_fractions=())
    run = trained_bank(
        data, "gaussian", SAEConfig("topk", 8, 16, k=2, n_seeds=2), bare, store=Store(tmp_path), progress=False
    )
    with pytest.raises(ValueError, match="llm_schedule"):
        last_doubling(run, bare)


def test_doubling_study_trains_one_run_per_budget_and_measures_held_out(tmp_path):
    store, x = Store(tmp_path), data()
    sae = SAEConfig("topk", 8, 32, k=2, n_seeds=2, decoder="unit")
    schedule = llm_schedule(steps=1, lr=1e-2, batch_size=64, seed=0, eval_rows=256, warmup_steps=2)
    budgets = []

    def run(s):
        budgets.append(s.steps)
        return trained_bank(x[:768], "gaussian", sae, s, store=store, progress=False)

    points = doubling_study(run, schedule, [640, 1280, 2560], x[768:])
    assert budgets == [10, 20, 40] and [p.tokens for p in points] == [640, 1280, 2560]
    for p in points:
        assert 0 < p.fvu < 1.5 and 0 <= p.dead_held_out <= 1 and -1 <= p.cosine_to_init <= 1
        assert p.l0 == pytest.approx(2, abs=0.01)
        assert p.seconds >= 0
    assert points[-1].cosine_to_init < 1 - 1e-3  # training moved the decoder
    report = study_convergence(points[::-1])  # order does not matter: the two largest budgets
    assert report.tokens == (1280, 2560) and report.fvu == (points[1].fvu, points[2].fvu)


def point(tokens: int, pw: float, fvu: float) -> StudyPoint:
    return StudyPoint(tokens, tokens // 8, pw, 0.0, fvu, 32.0, 0.0, 0.5)


def test_study_doublings_applies_the_criterion_to_every_doubling_in_token_order():
    points = [point(4000, 0.795, 0.1990), point(1000, 0.60, 0.25), point(2000, 0.78, 0.2000)]
    doublings = study_doublings(points)
    assert [d.tokens for d in doublings] == [(1000, 2000), (2000, 4000)]
    assert doublings[0].pw_mcc == (0.60, 0.78) and not doublings[0].converged
    assert doublings[1].pw_mcc_change == pytest.approx(0.015) and not doublings[1].converged  # FVU -0.5 %, PW-MCC not
    assert study_convergence(points) == doublings[-1]
    assert study_doublings([point(1000, 0.5, 0.2), point(2000, 0.505, 0.199)])[0].converged
    with pytest.raises(ValueError, match="at least two budgets"):
        study_doublings(points[:1])


def test_an_untrained_decoder_is_at_cosine_one_to_its_initialisation(tmp_path):
    schedule = replace(
        llm_schedule(steps=4, lr=1e-12, batch_size=64, seed=0, eval_rows=256, warmup_steps=0),
        normalize=False,
        b_dec_init="zeros",
    )
    run = trained_bank(
        data,
        "g",
        SAEConfig("relu", 8, 16, l1_coeff=1e-3, decoder="unit"),
        schedule,
        store=Store(tmp_path),
        progress=False,
    )
    assert decoder_cosine_to_init(run) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="step-0"):
        decoder_cosine_to_init(replace(run, checkpoints={}))
    assert np.isfinite(run.history["fvu"]).all()


def test_a_single_seed_run_is_judged_by_fvu_alone(tmp_path):
    schedule = replace(
        llm_schedule(steps=20, lr=1e-2, batch_size=64, seed=0, eval_rows=256, warmup_steps=2), checkpoint_fractions=()
    )
    run = trained_bank(data, "g", SAEConfig("topk", 8, 16, k=2), schedule, store=Store(tmp_path), progress=False)
    result = last_doubling(run, schedule)
    assert result.pw_mcc is None and result.pw_mcc_change is None
    assert result.converged == (abs(result.fvu_change) < 0.01)
    assert "n/a (one seed)" in str(result)


def test_report_warns_naming_the_runs_that_miss_the_criterion(capsys):
    good = Convergence((1, 2), (0.7, 0.7), (0.2, 0.2))
    bad = Convergence((1, 2), (0.6, 0.7), (0.2, 0.2))
    with pytest.warns(RuntimeWarning, match=r"1 of 2 .*topk/32"):
        records = report({"relu/32": good, "topk/32": bad})
    assert records["topk/32"]["converged"] is False and records["relu/32"]["converged"] is True
    assert "NOT converged" in capsys.readouterr().out
