"""URL passwords are masked at every boundary, and the real URLs of a sweep stay in one private
file (bln_sweeps.credentials); names that reach MLflow filters are checked (bln_sweeps.names)."""

import os
import stat

import pytest

from bln_sweeps.config import ConfigError
from bln_sweeps.credentials import (
    PRIVATE_FILE,
    mask_text,
    mask_tree,
    mask_url,
    split_private,
    with_private,
    write_private,
)
from bln_sweeps.names import check_name, filter_string


@pytest.mark.parametrize(
    "url, masked",
    [
        ("postgresql://bob:hunter2@db:5432/optuna", "postgresql://bob:***@db:5432/optuna"),
        # a '/' in the password: the regex this replaces stopped there and logged the rest
        ("postgresql://bob:pa/ss@db/optuna", "postgresql://bob:***@db/optuna"),
        (
            "postgresql+psycopg://bob:a:b/c%40d@db/x?sslmode=require",
            "postgresql+psycopg://bob:***@db/x?sslmode=require",
        ),
        ("postgresql://bob:p@ss@db/x", "postgresql://bob:***@db/x"),  # an unescaped '@'
        ("mysql://:only-a-password@db/x", "mysql://:***@db/x"),
        ("http://user:tok/en@mlflow.example:5000", "http://user:***@mlflow.example:5000"),
        ("mlflow-artifacts://u:p/q@h/x", "mlflow-artifacts://u:***@h/x"),  # urllib fallback
        ("postgresql://bob@db/x", "postgresql://bob@db/x"),  # no password: unchanged
        ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),
        ("not a url", "not a url"),
    ],
)
def test_mask_url_hides_exactly_the_password(url, masked):
    assert mask_url(url) == masked


def test_mask_text_finds_urls_inside_error_lines_and_commands():
    line = "storage.url='postgresql://u:s3/cr:t@127.0.0.1:1/x': cannot connect to 127.0.0.1"
    assert (
        mask_text(line)
        == "storage.url='postgresql://u:***@127.0.0.1:1/x': cannot connect to 127.0.0.1"
    )
    cmd = "bln-sweep tracking.uri=http://a:b/c@h:5000 storage.url=postgresql://u:p@h/d norm=bln"
    out = mask_text(cmd)
    assert "b/c" not in out and ":p@" not in out and out.endswith("norm=bln")
    tree = mask_tree({"tracking": {"uri": "http://a:tok@h"}, "n": 3, "l": ["mysql://u:pw@h/x"]})
    assert tree == {"tracking": {"uri": "http://a:***@h"}, "n": 3, "l": ["mysql://u:***@h/x"]}


def test_a_sweeps_real_urls_live_only_in_a_private_file(tmp_path):
    manifest = {
        "sweep": "s",
        "command": "bln-sweep storage.url=postgresql://u:pw/1@h/db",
        "storage_url": "postgresql://u:pw/1@h/db",
        "tracking_uri": "sqlite:////x/mlflow.db",
        "base_overrides": ["storage.url=postgresql://u:pw/1@h/db", "norm=bln"],
    }
    public, private = split_private(manifest)
    assert "pw/1" not in repr(public)
    assert private == {k: manifest[k] for k in ("storage_url", "base_overrides")}
    write_private(tmp_path / PRIVATE_FILE, private)
    mode = stat.S_IMODE(os.stat(tmp_path / PRIVATE_FILE).st_mode)
    assert mode == 0o600
    assert with_private(public, tmp_path)["storage_url"] == manifest["storage_url"]
    assert split_private({"storage_url": None, "tracking_uri": "sqlite:///a"})[1] == {}


@pytest.mark.parametrize("name", ["it's", 'say "x"', "a/b", "a\\b", "", " x", "..", "a\nb"])
def test_names_that_would_break_a_filter_or_a_path_are_rejected(name):
    with pytest.raises(ConfigError, match="sweep.name="):
        check_name("sweep.name", name)


def test_filters_quote_values_and_refuse_ones_they_cannot_quote():
    where = {"tags.sweep": "s $(x) ;`y`|z", "attributes.status": "RUNNING"}
    assert filter_string(where) == "tags.sweep = 's $(x) ;`y`|z' and attributes.status = 'RUNNING'"
    with pytest.raises(ValueError):
        filter_string({"tags.sweep": "x' or tags.kind = 'y"})


def test_tags_params_and_descriptions_reach_mlflow_masked(mlflow_uri):
    from bln_sweeps.tracking import RunLogger, tracking_client

    url = "postgresql://u:pa/ss@db/x"
    run = RunLogger.start(
        mlflow_uri,
        "masking",
        params={"storage.url": url},
        tags={"why": f"cannot reach {url}"},
        description=f"bln-sweep storage.url={url}",
    )
    run.set_tags({"status_reason": f"OperationalError: {url} refused"})
    run.end()
    data = tracking_client(mlflow_uri).get_run(run.run_id).data
    stored = repr(data.params) + repr(data.tags)
    assert "pa/ss" not in stored and stored.count("u:***@db/x") == 4


def test_a_function_that_raises_leaves_no_run_it_started_running(mlflow_uri):
    from bln_sweeps.tracking import RunLogger, ends_runs_on_error, tracking_client

    started = []

    @ends_runs_on_error
    def work():
        started.append(RunLogger.start(mlflow_uri, "guarded"))
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        work()
    run = tracking_client(mlflow_uri).get_run(started[0].run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["status"] == "failed"
    assert "No space left on device" in run.data.tags["status_reason"]
