"""The example of docs/OFFLOAD.md runs as written."""

from tests.doc_examples import run_example


def test_offload_doc_example_runs() -> None:
    run_example("OFFLOAD.md")
