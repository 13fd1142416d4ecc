"""`proxy sync --objects` parses a large file in two processes: the same documents, the same errors."""
from __future__ import annotations

import pytest

from netplane import objects
from netplane.proxy import cli


def big_manifest(services: int = 5000) -> str:
    docs = [f"apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: ns\n"
            f"  annotations:\n    note: |\n      a block scalar\n      ---- not a marker\n"
            f"spec:\n  clusterIP: 10.96.{i // 256}.{i % 256}\n  ports:\n  - port: 80\n"
            for i in range(services)]
    return "---\n" + "--- # a comment after the marker\n".join(docs)


def test_a_large_file_parsed_in_two_equals_one_parse(tmp_path):
    text = big_manifest()
    assert len(text) > cli.PARALLEL_BYTES
    split = cli._document_start(text, len(text) // 2)
    assert text[split:].startswith("--- # a comment")
    assert cli._parse_in_two(text, split) == list(cli.yaml.load_all(text, Loader=cli.FastLoader))
    path = tmp_path / "objects.yaml"
    path.write_text(text)
    loaded = cli.load_objects(str(path))
    assert [o["metadata"]["name"] for o in loaded] == [f"svc-{i}" for i in range(5000)]


def test_document_markers_are_whole_lines_only():
    assert cli._document_start("a: 1\n----\nb: 2\n--- \nc: 3\n", 0) == len("a: 1\n----\nb: 2\n")
    assert cli._document_start("a: 1\n---x\n", 0) is None
    assert cli._document_start("a: 1\n---", 0) == 5


@pytest.mark.parametrize("where", ["first", "second"])
def test_an_error_in_either_half_names_the_same_document_and_line_as_one_parse(tmp_path, where):
    text = big_manifest()
    broken_at = len(text) // 4 if where == "first" else 3 * len(text) // 4
    line_start = text.rfind("\n", 0, broken_at) + 1
    text = text[:line_start] + "  bad: [unclosed\n" + text[line_start:]
    path = tmp_path / "objects.yaml"
    path.write_text(text)
    with pytest.raises(objects.ManifestError) as parallel:
        cli.load_objects(str(path))
    with pytest.raises(cli.yaml.YAMLError) as serial:
        list(cli.yaml.load_all(text, Loader=cli.FastLoader))
    assert str(serial.value) in str(parallel.value)
    assert f"line {text[:line_start].count(chr(10)) + 1}" in str(parallel.value)
