"""`bench recipes`: its table, its goals and its place in BENCHMARKS.md (the measuring itself is the benchmark)."""
from engine.__main__ import main
from engine.bench import recipe_bench
from engine.data import transfer_tasks


def cell(old, new, grid=None, seconds=(10.0, 20.0)):
    c = {"old": {"mean": old, "spread": 0.01, "seconds": seconds[0], "n": 3},
         "new": {"mean": new, "spread": 0.02, "seconds": seconds[1], "n": 3, "first": new}, "complete": True}
    if grid is not None:
        c["grid"] = {"mean": grid, "spread": 0.0, "seconds": 30.0, "n": 3, "point": {"lr": 0.001}, "tried": []}
    return c


def test_goals_read_the_measurements():
    done = {"sample|full": cell(0.6, 0.87, 0.88, seconds=(12.0, 30.0)), "digits|full": cell(0.5, 0.9, 0.95)}
    goals = {g: (m, ok) for g, m, ok in recipe_bench.goals(done)}
    assert goals["the sample at >= 85% with the default strategy (full) and the bundled backbone"][1] == "yes"
    assert goals["the default result in no more time than the old full default"][1] == "**no**"
    assert goals["sample, full: new defaults within 2 points of the grid's best"] == ("-1.0 points", "yes")
    assert goals["digits, full: new defaults within 2 points of the grid's best"][1] == "**no**"
    table = recipe_bench.format_markdown(done)
    assert "| sample | full | 60.0% ± 1.0% | 12.0 | 87.0% ± 2.0% | 30.0 | 88.0% ± 0.0% | 30.0 | lr 0.001 | -1.0 pt |" in table


def test_the_section_replaces_itself_and_survives_bench_all(tmp_path, monkeypatch):
    from engine.bench import suite

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nbench all's table\n")
    recipe_bench.write_markdown({"sample|full": cell(0.6, 0.87, 0.88)}, path)
    recipe_bench.write_markdown({"sample|full": cell(0.6, 0.9, 0.9)}, path)
    text = path.read_text()
    assert text.count(recipe_bench.HEAD) == 1 and "90.0%" in text and "bench all's table" in text
    section = recipe_bench.section_of(text)
    assert section.startswith(recipe_bench.HEAD)
    # bench all rewrites its own part and keeps the recipe section
    monkeypatch.setattr(suite, "format_markdown", lambda r: "# Benchmarks\n\nnew bench all table\n")
    suite.write_markdown({}, path)
    text = path.read_text()
    assert "new bench all table" in text and recipe_bench.section_of(text) == section


def test_cli_refuses_unknown_datasets_and_strategies(capsys):
    assert main(["bench", "recipes", "--datasets", "imagenet"]) == 2
    assert "imagenet" in capsys.readouterr().err
    assert main(["bench", "recipes", "--strategies", "magic"]) == 2
    assert main(["bench", "recipes", "--seeds", "0"]) == 2


def test_digits_are_real_scans_in_class_folders(tmp_path):
    folder = transfer_tasks.write_digits(tmp_path / "d", 3)
    assert sorted(p.name for p in folder.iterdir()) == [f"digit_{c}" for c in range(10)]
    assert all(len(list((folder / f"digit_{c}").glob("*.png"))) == 3 for c in range(10))


def test_rewriting_a_section_in_the_middle_changes_nothing_else(tmp_path):
    """The same section written twice gives the same file (no blank line gained per rewrite)."""
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nbench all's table\n")
    recipe_bench.write_markdown({"sample|full": cell(0.6, 0.9, 0.9)}, path)
    path.write_text(path.read_text() + "\n## Later section\n\nits text\n")
    before = path.read_text()
    for _ in range(3):
        recipe_bench.write_markdown({"sample|full": cell(0.6, 0.9, 0.9)}, path)
    assert path.read_text() == before
