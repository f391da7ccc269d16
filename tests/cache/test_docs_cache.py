"""The example of docs/CACHE.md runs as written."""

from tests.doc_examples import run_example


def test_cache_doc_example_runs() -> None:
    run_example("CACHE.md")
