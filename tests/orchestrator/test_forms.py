"""The form of a placement (forms.py) on a table of cases: its offload is compared by what it
placed. An offload that streamed nothing placed the model whole, as ``none`` does; one that streams
is only the same as itself; a form not loaded yet (a load in flight) may still stream."""

from __future__ import annotations

import pytest

from modelkeeper.orchestrator.forms import LoadForm, Offload

GB = 1_000_000_000


@pytest.mark.parametrize(
    ("form", "asked", "alike"),
    [
        # loaded whole with an offload that streamed nothing: as `none` (and `auto`) place it
        (LoadForm(offload=4 * GB, streams=False), "none", True),
        (LoadForm(offload=4 * GB, streams=False), "auto", True),
        (LoadForm(offload=4 * GB, streams=False), 4 * GB, True),
        (LoadForm(offload=4 * GB, streams=False), 8 * GB, True),  # a larger count streams nothing either
        (LoadForm(offload=4 * GB, streams=False), GB, False),  # a smaller one might
        (LoadForm(offload="auto", streams=False), "none", True),
        (LoadForm(offload="auto", streams=False), 4 * GB, False),  # the model's size is not the form's
        (LoadForm(offload="none", streams=False), "auto", True),
        (LoadForm(offload="none", streams=False), 4 * GB, False),
        # it streams: only the offload it was loaded with places it so
        (LoadForm(offload=GB, streams=True), "none", False),
        (LoadForm(offload=GB, streams=True), "auto", False),
        (LoadForm(offload=GB, streams=True), 4 * GB, False),
        (LoadForm(offload=GB, streams=True), GB, True),
        (LoadForm(offload="auto", streams=True), "none", False),
        (LoadForm(offload="auto", streams=True), "auto", True),
        # not loaded yet: `none` and `auto` alike, a count only itself
        (LoadForm(offload=4 * GB), "none", False),
        (LoadForm(offload=4 * GB), 4 * GB, True),
        (LoadForm(offload=4 * GB), 8 * GB, False),
        (LoadForm(offload="auto"), "none", True),
        (LoadForm(), "auto", True),
        (LoadForm(), 4 * GB, False),
    ],
)
def test_offload_is_compared_by_what_was_placed(form: LoadForm, asked: Offload, alike: bool) -> None:
    assert form.places_alike(asked) is alike
    differences = form.differences(None, None, asked)
    assert differences == ({} if alike else {"offload": {"loaded": form.offload, "asked": asked}})


def test_an_offload_left_out_asks_for_nothing() -> None:
    assert LoadForm(offload=GB, streams=True).differences("float16", None, None) == {
        "dtype": {"loaded": "the file's", "asked": "float16"}
    }


@pytest.mark.parametrize(
    ("dtypes", "storages", "shown", "same", "other"),
    [
        # a GGUF Flux without dtype: its transformer computes in bfloat16, its parts stay float16
        (["bfloat16", "float16", "float16", "float16"], ["gguf:Q4_K", None, None, None], "bfloat16", "bfloat16", "float16"),
        (["bfloat16"], ["float8_e5m2"], "bfloat16", "bfloat16", "float16"),
        # nothing packed and mixed: no one compute dtype
        (["float16", "float32"], [None, None], None, None, "float16"),
        (["float16", "float16"], [None, None], "float16", "float16", "bfloat16"),
    ],
)  # fmt: skip
def test_a_packed_model_loaded_without_dtype_computes_in_the_dtype_its_worker_chose(
    dtypes: list[str | None], storages: list[str | None], shown: str | None, same: str | None, other: str
) -> None:
    form = LoadForm().loaded(dtypes, storages, streams=False)
    assert form.shown_dtype == shown and form.info()["dtype"] == shown
    if same is not None:
        assert form.differences(same, None, None) == {}
    assert form.differences(other, None, None) == {
        "dtype": {"loaded": shown or "/".join(sorted(set(dtypes))), "asked": other}
    }
    assert form.kept_by_reload(None, None, None) == {}  # a reload without dtype keeps the files' dtypes
