"""Dataset list parsing and folder-per-class scanning."""

from __future__ import annotations

from pathlib import Path

import pytest

from staprune.data.lists import VideoItem, load_items, read_list, scan_folders


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_space_separated_with_spaces_in_paths(tmp_path):
    lst = write(
        tmp_path / "val.csv",
        "abseiling/clip 001.mp4 0\n"
        "  air drumming/x.mp4\t12  \n"  # tab separator, surrounding whitespace
        "plain.mp4 399\n",
    )
    items = read_list(lst, root="/data/k400")
    assert items == [
        VideoItem(Path("/data/k400/abseiling/clip 001.mp4"), 0),
        VideoItem(Path("/data/k400/air drumming/x.mp4"), 12),
        VideoItem(Path("/data/k400/plain.mp4"), 399),
    ]


def test_comma_format_blank_lines_and_comments(tmp_path):
    lst = write(
        tmp_path / "list.csv",
        "# path,label\n\n"
        "a/b.webm,3\n"
        "c.webm, 4\n"  # space after the comma must not end up in the path
        "   \n"
        "  # indented comment\n"
        "odd,name.mp4,5\n"  # comma inside the path: split on the last one
        "sp ace,x.mp4 6\n",  # comma in path, space-separated label
    )
    items = read_list(lst, root=tmp_path / "root")
    assert [(i.path.relative_to(tmp_path / "root").as_posix(), i.label) for i in items] == [
        ("a/b.webm", 3),
        ("c.webm", 4),
        ("odd,name.mp4", 5),
        ("sp ace,x.mp4", 6),
    ]


def test_absolute_paths_kept_and_default_root(tmp_path):
    lst = write(tmp_path / "l.txt", "/abs/v.mp4 1\nrel/v.mp4 2\n")
    items = read_list(lst)
    assert items[0].path == Path("/abs/v.mp4")
    assert items[1].path == tmp_path / "rel" / "v.mp4"  # relative to the list file's directory


def test_byte_order_mark_is_ignored(tmp_path):
    lst = tmp_path / "bom.txt"
    lst.write_bytes("\ufeffv.mp4 7\n".encode())
    assert read_list(lst, root="/r") == [VideoItem(Path("/r/v.mp4"), 7)]


@pytest.mark.parametrize(
    ("bad_line", "lineno"),
    [("only_a_path.mp4", 3), ("video.mp4 cat", 3), ("video.mp4 -1", 3), ("video.mp4 1.5", 3), (" 5", 3)],
)
def test_malformed_line_reports_file_and_line(tmp_path, bad_line, lineno):
    lst = write(tmp_path / "bad.csv", f"ok.mp4 0\n# comment\n{bad_line}\nok2.mp4 1\n")
    with pytest.raises(ValueError, match=rf"bad\.csv:{lineno}: expected") as err:
        read_list(lst)
    assert bad_line.strip() in str(err.value)


def test_missing_list_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_list(tmp_path / "nope.csv")


def make_tree(root: Path) -> None:
    for cls, files in {
        "zumba": ["b.mp4", "a.MKV"],
        "abseiling": ["1.avi", "notes.txt", "2.webm"],
        "bowling": ["x.mov"],
        "empty class": [],
        ".hidden": ["h.mp4"],
    }.items():
        (root / cls).mkdir(parents=True)
        for name in files:
            (root / cls / name).write_bytes(b"")
    (root / "stray.mp4").write_bytes(b"")  # not in a class folder: ignored
    (root / "zumba" / "sub").mkdir()  # nested dirs are not videos


def test_folder_layout_labels(tmp_path):
    make_tree(tmp_path)
    items, classes = scan_folders(tmp_path)
    assert classes == ["abseiling", "bowling", "empty class", "zumba"]
    got = [(i.path.relative_to(tmp_path).as_posix(), i.label) for i in items]
    assert got == [
        ("abseiling/1.avi", 0),
        ("abseiling/2.webm", 0),
        ("bowling/x.mov", 1),
        ("zumba/a.MKV", 3),
        ("zumba/b.mp4", 3),
    ]


def test_folder_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        scan_folders(tmp_path / "missing")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no videos"):
        scan_folders(tmp_path)


def test_load_items_dispatch(tmp_path):
    make_tree(tmp_path / "tree")
    items, classes = load_items(tmp_path / "tree")
    assert classes is not None and len(items) == 5

    lst = write(tmp_path / "list.txt", "a.mp4 1\n")
    items, classes = load_items(lst, root="/root")
    assert classes is None and items == [VideoItem(Path("/root/a.mp4"), 1)]

    with pytest.raises(FileNotFoundError, match="not found"):
        load_items(tmp_path / "nothing")
