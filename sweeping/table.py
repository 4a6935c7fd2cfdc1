"""Tables of runs, shared by sweep.py's leaderboard and the summary that ends a `run.py -m`:
the same cells in the terminal and in a CSV file beside the runs."""

import contextlib
import csv
import io
from pathlib import Path

from engine.files import atomic_write_text


def fmt(value) -> str:
    """A cell: floats to 4 significant digits, nothing for None."""
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(title: str, rows: list[dict]) -> None:
    """`rows` (dicts with the same keys) as a table; `run_dir` cells relative to the current
    folder where they are inside it."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in rows[0] if rows else ["trial"]:
        table.add_column(column)
    here = Path.cwd()
    for row in rows:
        cells = []
        for key, value in row.items():
            if key == "run_dir" and value:
                with contextlib.suppress(ValueError):
                    value = Path(value).relative_to(here)
            cells.append(fmt(value))
        table.add_row(*cells)
    console = Console()
    # a log file or a pipe gets the whole table rather than 80 columns of wrapped cells
    console = console if console.is_terminal else Console(width=240)
    # the title on a line of its own: above a narrow table, rich would wrap it to the table
    console.print(title, soft_wrap=True, markup=False, highlight=False)
    console.print(table)


def write_csv(rows: list[dict], path: Path) -> Path:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())
