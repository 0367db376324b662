"""``plan_postprocessing`` on the model zoo's postprocessing patterns: what the fused fast path may take
over, what must run as the bundle's own MONAI transforms (plain path), what is refused."""

from __future__ import annotations

import shutil

import pytest
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureTyped,
    FillHolesd,
    Invertd,
    KeepLargestConnectedComponentd,
    SaveImaged,
    Spacingd,
)
from zoo_bundles import SPLEEN

from app.bundle.config import bundle_parser
from app.errors import ConfigError
from app.inference.postprocess import plan_postprocessing

PRE = Compose([Spacingd(keys="image", pixdim=(1.0, 1.0, 1.0))])


def _invert(nearest: bool = False) -> Invertd:
    return Invertd(keys="pred", transform=PRE, orig_keys="image", nearest_interp=nearest)


def _save(tmp_path) -> SaveImaged:
    return SaveImaged(keys="pred", output_dir=str(tmp_path))


def test_the_zoo_spleen_bundles_own_postprocessing_is_fused(tmp_path):
    root = tmp_path / "spleen"
    shutil.copytree(SPLEEN, root)
    post = bundle_parser(root, ["inference"]).get_parsed_content("postprocessing")
    plan = plan_postprocessing(post)
    assert plan.fast and plan.reason == "" and plan.label_steps == []
    assert plan.inverts
    # the plain path runs the bundle's own steps, without its writer
    assert [type(t).__name__ for t in plan.plain.transforms] == ["Activationsd", "Invertd", "AsDiscreted"]


def test_label_steps_after_invert_and_argmax_run_on_the_source_grid(tmp_path):
    largest = KeepLargestConnectedComponentd(keys="pred", applied_labels=[1, 2])
    holes = FillHolesd(keys="pred")
    post = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            _invert(),
            AsDiscreted(keys="pred", argmax=True),
            EnsureTyped(keys="pred"),
            largest,
            holes,
            _save(tmp_path),
        ]
    )
    plan = plan_postprocessing(post)
    assert plan.fast, plan.reason
    assert plan.label_steps == [largest, holes]  # in the bundle's order, the writer dropped


def test_label_steps_before_a_nearest_invert_take_the_plain_path(tmp_path):
    """argmax -> KeepLargest -> Invertd(nearest): the largest component is chosen on the network grid,
    which the fused path (labels made on the source grid) cannot reproduce."""
    post = [
        Activationsd(keys="pred", softmax=True),
        AsDiscreted(keys="pred", argmax=True),
        KeepLargestConnectedComponentd(keys="pred", applied_labels=[1]),
        _invert(nearest=True),
        _save(tmp_path),
    ]
    plan = plan_postprocessing(post)
    assert not plan.fast
    assert plan.reason == "label operations on the network grid before Invertd"
    assert plan.inverts and [type(t).__name__ for t in plan.plain.transforms][-1] == "Invertd"


def test_invert_of_discrete_labels_takes_the_plain_path():
    plan = plan_postprocessing([AsDiscreted(keys="pred", argmax=True), _invert(nearest=True)])
    assert not plan.fast and plan.reason == "Invertd of discrete labels"


def test_label_steps_without_invert_take_the_plain_path():
    post = [AsDiscreted(keys="pred", argmax=True), KeepLargestConnectedComponentd(keys="pred")]
    plan = plan_postprocessing(post)
    assert not plan.fast and "no Invertd" in plan.reason


@pytest.mark.parametrize(
    "step,why",
    [
        (AsDiscreted(keys="pred", argmax=True, to_onehot=3), "AsDiscreted other than one plain argmax"),
        (KeepLargestConnectedComponentd(keys="pred"), "KeepLargestConnectedComponentd between the network"),
    ],
)
def test_other_steps_before_the_argmax_take_the_plain_path(step, why):
    plan = plan_postprocessing([Activationsd(keys="pred", softmax=True), step, _invert()])
    assert not plan.fast and plan.reason.startswith(why)


def test_no_postprocessing_is_fused():
    plan = plan_postprocessing(None)
    assert plan.fast and plan.plain is None and not plan.inverts


@pytest.mark.parametrize(
    "activation",
    [Activationsd(keys="pred", sigmoid=True), Activationsd(keys="pred", other=lambda x: x)],
    ids=["sigmoid", "custom"],
)
def test_sigmoid_outputs_are_refused_in_one_line(activation):
    with pytest.raises(ConfigError) as err:
        plan_postprocessing(
            [activation, _invert(), AsDiscreted(keys="pred", threshold=0.5)], "b/configs/inference.json"
        )
    message = str(err.value)
    assert "\n" not in message and "b/configs/inference.json" in message
    assert "sigmoid" in message and "overlapping labels" in message


def test_invertd_with_nearest_interpolation_of_the_scores_takes_the_plain_path():
    """Invertd's default (nearest_interp=True) resamples the probabilities by nearest neighbour."""
    post = [Activationsd(keys="pred", softmax=True), _invert(nearest=True), AsDiscreted(keys="pred", argmax=True)]
    plan = plan_postprocessing(post)
    assert not plan.fast and "nearest_interp" in plan.reason


@pytest.mark.parametrize(
    "steps,probabilities",
    [
        (["softmax", "invert", "argmax"], True),
        (["invert", "argmax"], False),  # Invertd resamples the logits
        (["invert", "softmax", "argmax"], False),
        (["argmax"], True),  # no way back in the bundle: segapp's own choice
    ],
)
def test_what_the_way_back_interpolates(steps, probabilities):
    make = {
        "softmax": lambda: Activationsd(keys="pred", softmax=True),
        "invert": _invert,
        "argmax": lambda: AsDiscreted(keys="pred", argmax=True),
    }
    plan = plan_postprocessing([make[s]() for s in steps])
    assert plan.fast and plan.probabilities is probabilities
