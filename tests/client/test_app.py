"""The site's handlers on a real (tiny) site dataset, without a Flower runtime."""

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from client.site.handlers import evaluate_content, prepare, train_content
from client.site.simulated import research_policy
from common.errors import DataError, ModelError
from common.models import get_model
from common.records import expected_spec, state_to_record
from tests.sites import tiny_site


@pytest.fixture
def site(tmp_path):
    return tiny_site(tmp_path / "site")


def _content(model=None):
    return RecordDict(
        {
            "arrays": state_to_record(model or get_model("cnn")),
            "config": ConfigRecord({"server-round": 1}),
        }
    )


def prepare_(content, context):
    return prepare(content, context, policy=research_policy())


def _context(site, **run):
    return Context(
        run_id=1,
        node_id=1,
        node_config={"dataset-dir": str(site), "state-dir": str(site.parent / "state")},
        state=RecordDict(),
        run_config=run,
    )


@pytest.mark.parametrize("dp", [True, False])
def test_train_reply_holds_only_model_arrays_and_numeric_metrics(site, dp):
    ctx = _context(site, **{"batch-size": 8, "dp.enabled": dp})
    reply = train_content(prepare_(_content(), ctx))
    arrays = reply.array_records["arrays"].to_torch_state_dict()
    spec = expected_spec(get_model("cnn"))
    assert {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()} == spec
    metrics = reply.metric_records["metrics"]
    assert metrics["num-examples"] == 30
    assert all(isinstance(v, int | float) for v in metrics.values())
    if dp:  # Opacus Poisson sampling: the number of steps is random; epsilon is reported
        assert 0 < metrics["epsilon"] <= 10 and metrics["delta"] == pytest.approx(0.1 / 30)
    else:
        assert metrics["train-steps"] == 4 and "epsilon" not in metrics


def test_evaluate_reply_reports_local_validation(site):
    reply = evaluate_content(prepare_(_content(), _context(site)))
    metrics = reply.metric_records["metrics"]
    assert metrics["num-examples"] == 10
    assert 0.0 <= metrics["val-accuracy"] <= 1.0


def test_dataset_that_does_not_fit_the_run_is_refused(site):
    with pytest.raises(DataError, match=r"has 2 classes, run config .num-classes. is 3"):
        prepare_(_content(get_model("cnn", num_classes=3)), _context(site, **{"num-classes": 3}))


def test_arrays_of_another_model_are_refused(site):
    with pytest.raises(ModelError, match="expects"):
        prepare_(_content(get_model("cnn", width=16)), _context(site))


@pytest.mark.parametrize("fold", [True, False])
def test_evaluate_in_train_validates_the_received_model_before_training(site, fold):
    # Prepare: the global model the coordinator sends
    model = get_model("cnn")
    ctx = _context(site, **{"batch-size": 8, "dp.enabled": False, "evaluate-in-train": fold})
    expected = evaluate_content(prepare_(_content(model), ctx)).metric_records["metrics"]
    # Execute
    job = prepare_(_content(model), ctx)
    reply = train_content(job, evaluate_first=job.run.evaluation.in_train)
    # Assert: the train reply carries the evaluate message's validation of the same model,
    # and the count of validation images as val-num-examples (the evaluate reply's
    # num-examples; an exact int, the weight of the federated mean)
    metrics = reply.metric_records["metrics"]
    val = {k: v for k, v in metrics.items() if k.startswith("val-")}
    if fold:
        count = val.pop("val-num-examples")
        assert count == expected["num-examples"] == 10 and type(count) is int
        assert val == {k: v for k, v in expected.items() if k.startswith("val-")}
        assert val["val-accuracy"] == pytest.approx(expected["val-accuracy"])
    else:
        assert val == {}
