"""The phase state machine on its own: no torch, scripted validation scores."""

import pytest

from dendrite_convert.training.schedule import Schedule, ScheduleConfig


def run(scores, **config):
    schedule = Schedule(ScheduleConfig(**config))
    actions = []
    for score in scores:
        decision = schedule.observe(score)
        actions.append(decision.action)
        if decision.action == "stop":
            break
    return schedule, actions


def test_thresholds_are_relative_and_absolute_and_tighten_per_dendrite():
    s = Schedule(ScheduleConfig(maximize=True))
    assert s.beats(0.5, None)
    assert not s.beats(0.5004, 0.5)  # 0.5004 * (1 - 0.001) < 0.5: relative margin not met
    assert s.beats(0.502, 0.5)
    s.dendrites = 1  # threshold 0.0001 after the first dendrite
    assert s.beats(0.5004, 0.5)
    s.dendrites = 5  # 0.0: only the absolute 1e-5 remains
    assert s.beats(0.50002, 0.5) and not s.beats(0.500005, 0.5)
    low = Schedule(ScheduleConfig(maximize=False))
    assert low.beats(0.9, 1.0) and not low.beats(0.9995, 1.0)


def test_relative_threshold_holds_for_negative_scores():
    # the default score is -loss: 0.05 % better must not count while the relative threshold asks for 0.1 %
    high = Schedule(ScheduleConfig(maximize=True))
    assert not high.beats(-0.9995, -1.0) and high.beats(-0.998, -1.0)
    assert not high.beats(-1.0, -1.0) and not high.beats(-1.01, -1.0)
    low = Schedule(ScheduleConfig(maximize=False))
    assert not low.beats(-1.0005, -1.0) and low.beats(-1.002, -1.0)
    assert not low.beats(-0.99, -1.0)
    # a slowly creeping -loss keeps the network in its neuron phase no longer than patience allows
    creeping = [-1.0 + 0.0001 * i for i in range(8)]
    s, actions = run(creeping, patience=3, max_dendrites=1)
    assert actions[:4] == ["continue"] * 3 + ["add"]


def test_patience_switch_then_new_architecture_must_beat_global_best():
    # improves for 3 epochs, then flat for patience=2 -> add; the new arch improves -> accepted
    scores = [0.5, 0.6, 0.7, 0.7, 0.7, 0.65, 0.8, 0.8, 0.8]
    s, actions = run(scores, patience=2, max_dendrites=1)
    assert actions == ["continue"] * 4 + ["add", "continue", "continue", "continue", "stop"]
    assert s.switches == [{"epoch": 5, "dendrites": 1, "kind": "add"}]
    assert (s.best, s.best_epoch, s.best_dendrites) == (0.8, 7, 1)
    assert s.dendrites == 1 and s.stop_reason == "reached --max-dendrites 1"


def test_failed_architecture_is_retried_once_then_best_restored():
    scores = [0.5, 0.7, 0.7, 0.7] + [0.6, 0.6, 0.6] + [0.65, 0.69, 0.69, 0.69]
    s, actions = run(scores, patience=2)
    assert actions == ["continue"] * 3 + ["add", "continue", "continue", "retry", "continue", "continue",
                                          "continue", "stop"]
    assert [sw["kind"] for sw in s.switches] == ["add", "retry"]
    assert s.switches[1] == {"epoch": 7, "dendrites": 1, "kind": "retry"}
    assert s.done and s.stop_reason == "1 dendrite did not beat the best score after a retry"  # not "1 dendrites"
    assert s.dendrites == 0 and s.best == 0.7 and s.best_epoch == 2


def test_retry_that_succeeds_resets_tries():
    scores = [0.5, 0.5, 0.5] + [0.4, 0.4, 0.4] + [0.6, 0.6, 0.6] + [0.7, 0.7]
    s, actions = run(scores, patience=2, max_dendrites=5, max_epochs=11)
    assert [sw["kind"] for sw in s.switches] == ["add", "retry", "add"]
    assert s.tries == 0 and s.dendrites == 2


def test_switch_every_is_fixed_and_ignores_improvement():
    s, actions = run([0.1 * i for i in range(1, 10)], switch_every=3, max_dendrites=2)
    assert [sw["epoch"] for sw in s.switches] == [3, 6]
    assert actions[-1] == "stop" and s.epoch == 9


def test_max_epochs_stops_and_drops_a_switch_that_cannot_be_trained():
    s, actions = run([0.5, 0.5, 0.5, 0.5], patience=1, max_epochs=2)
    assert actions == ["continue", "stop"] and s.switches == [] and s.dendrites == 0
    assert s.stop_reason == "reached --max-epochs 2"


def test_capacity_test_adds_three_dendrites_and_keeps_them():
    s, actions = run([0.1, 0.05, 0.02, 0.01, 0.0], capacity_test=True)  # scores get worse: still kept
    assert actions == ["add", "add", "add", "stop"]
    assert s.dendrites == 3 and "capacity test passed" in s.stop_reason
    assert (s.best_epoch, s.best_dendrites, s.best) == (4, 3, 0.01)


def test_max_dendrites_zero_is_early_stopping():
    s, actions = run([0.5, 0.6, 0.6, 0.6, 0.6], patience=3, max_dendrites=0)
    assert actions == ["continue"] * 4 + ["stop"] and s.best_epoch == 2


def test_dendrite_phase_counts_as_epoch_but_not_patience():
    s = Schedule(ScheduleConfig(patience=2))
    for v in (0.5, 0.5, 0.5):
        s.observe(v)
    assert s.dendrites == 1
    s.note_dendrite_phase()
    assert s.epoch == 4 and s.observe(0.4).action == "continue"


def test_state_round_trips_for_resume():
    scores = [0.5, 0.7, 0.7, 0.7, 0.6, 0.6, 0.6, 0.65]
    full, _ = run(scores, patience=2)
    half, _ = run(scores[:4], patience=2)
    resumed = Schedule.from_dict(half.to_dict())
    for v in scores[4:]:
        resumed.observe(v)
    assert resumed.to_dict() == full.to_dict()


def test_nan_never_becomes_best():
    s = Schedule(ScheduleConfig())
    assert s.observe(float("nan")).save_best is False and s.best is None


@pytest.mark.parametrize("bad", [{"patience": 0}, {"switch_every": 0}, {"max_epochs": 0}, {"thresholds": ()}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        ScheduleConfig(**bad)
