"""Fernhollow Instruments' live-data tools (the fictional company of the course's data), ready for function calling.

Three typed functions, each a `llmlab.tools.Tool` whose schema is the one in `data/tools.json`:
`get_leave_balance(employee_name)` and `find_employee(name)` read `data/employees.csv`;
`book_meeting_room(room, date, hours)` books a room, keeping the bookings in memory (`bookings()`,
`reset_bookings()`). Wrong input (an unknown employee, a weekend, a full room, ...) raises `ValueError`
with a message a model can act on; `llmlab.tools.run` sends that message back to the model.

>>> from llmlab.course import company
>>> company.get_leave_balance("Kwame Mensah")["leave_days_left"]
13
>>> [t.name for t in company.company_tools()]
['get_leave_balance', 'find_employee', 'book_meeting_room']
>>> result = llmlab.tools.run(lab, messages, company.company_tools())  # doctest: +SKIP

Also the data around the tools: `employees()` (the table), `tool_definitions()` (data/tools.json) and
`system_prompt()` (the assistant's system prompt of data/tools_train.jsonl). The tool-calling questions are in
`llmlab.course.questions`, their score in `llmlab.course.evaluation.evaluate_tool_calls`.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import threading
from functools import lru_cache
from typing import Annotated, Any, Literal

import pandas as pd
import pydantic

from llmlab.course.data import DATA_DIR, read_jsonl
from llmlab.tools import Tool, tool

__all__ = [
    "ROOMS",
    "book_meeting_room",
    "bookings",
    "company_tools",
    "employees",
    "find_employee",
    "get_leave_balance",
    "reset_bookings",
    "system_prompt",
    "tool_definitions",
]

Room = Literal["Touriga", "Alvarinho", "Baga", "Arinto", "Vecht", "Lek", "Amstel"]
# Room -> site, and each site's opening hours on working days (data/handbook/meeting_rooms.md).
ROOMS: dict[str, str] = {
    "Touriga": "Porto",
    "Alvarinho": "Porto",
    "Baga": "Porto",
    "Arinto": "Porto",
    "Vecht": "Utrecht",
    "Lek": "Utrecht",
    "Amstel": "Utrecht",
}
OPENING_HOURS: dict[str, tuple[dt.time, dt.time]] = {
    "Porto": (dt.time(7, 30), dt.time(20, 0)),
    "Utrecht": (dt.time(8, 0), dt.time(19, 0)),
}
MAX_BOOKING_HOURS = 4


# ------------------------------------------------------------------------------------------ the table
@lru_cache(maxsize=1)
def _table() -> pd.DataFrame:
    frame = pd.read_csv(DATA_DIR / "employees.csv", dtype={"manager": "string"}, keep_default_na=False)
    frame["manager"] = frame["manager"].replace("", pd.NA)
    return frame


def employees() -> pd.DataFrame:
    """The employee table of data/employees.csv (a copy): id, name, team, manager, location, leave days, ...

    >>> employees().set_index("name").loc["Lotte Jansen", "leave_days_left"]
    np.int64(23)
    """
    return _table().copy()


def _row(name: str) -> pd.Series:
    """The employee called `name` (case and spacing do not matter), or a `ValueError` that suggests names."""
    table = _table()
    wanted = " ".join(str(name).split()).casefold()
    found = table[table["name"].str.casefold() == wanted]
    if len(found):
        return found.iloc[0]
    names = table["name"].tolist()
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"no employee named {name!r} at Fernhollow.{hint} Use the employee's full name.")


def _plain(value: Any) -> Any:
    """A pandas/numpy scalar as a plain Python value (None for a missing one), ready for JSON."""
    if value is pd.NA or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value


# ------------------------------------------------------------------------------------------ the tools
@tool
def get_leave_balance(employee_name: str) -> dict:
    """Get an employee's annual leave for the current leave year (1 February to 31 January): days in total, taken and left.

    Args:
        employee_name: Full name of the employee, e.g. 'Kwame Mensah'.

    Returns:
        `{"employee_name", "leave_days_total", "leave_days_taken", "leave_days_left"}`.

    >>> get_leave_balance("Kwame Mensah")
    {'employee_name': 'Kwame Mensah', 'leave_days_total': 27, 'leave_days_taken': 14, 'leave_days_left': 13}
    """
    row = _row(employee_name)
    return {
        "employee_name": row["name"],
        **{k: _plain(row[k]) for k in ("leave_days_total", "leave_days_taken", "leave_days_left")},
    }


@tool
def find_employee(name: str) -> dict:
    """Look up an employee by name: their team, manager, office location, laptop and start date.

    Args:
        name: Full name of the employee, e.g. 'Sanne de Groot'.

    Returns:
        `{"employee_id", "name", "team", "manager", "location", "laptop", "start_date"}` (manager None for
        the CEO).

    >>> find_employee("Kwame Mensah")["manager"]
    'Marta Sousa'
    """
    row = _row(name)
    columns = ("employee_id", "name", "team", "manager", "location", "laptop", "start_date")
    return {k: _plain(row[k]) for k in columns}


_bookings: list[dict] = []
_bookings_lock = threading.Lock()
_FIRST_BOOKING_NUMBER = 4101


@tool
def book_meeting_room(
    room: Room,
    date: str,
    hours: Annotated[int, pydantic.Field(ge=1, le=MAX_BOOKING_HOURS)],
) -> dict:
    """Book a meeting room in the Porto office (Touriga, Alvarinho, Baga, Arinto) or the Utrecht lab (Vecht, Lek, Amstel) for a number of hours on a date. A booking lasts at most 4 hours.

    The booking takes the first free hours of that day, from the site's opening time. Bookings are kept
    in memory for this Python session (see `bookings()` and `reset_bookings()`).

    Args:
        room: The room's name.
        date: The date in ISO format YYYY-MM-DD, e.g. '2026-12-03'.
        hours: How many hours to book, from 1 to 4.

    Returns:
        `{"booked": True, "booking_id", "room", "date", "hours", "start", "end"}`.

    >>> book_meeting_room("Baga", "2026-12-03", 2)["start"]  # doctest: +SKIP
    '07:30'
    """
    if room not in ROOMS:
        raise ValueError(f"there is no room {room!r}; the rooms are {', '.join(ROOMS)}")
    if isinstance(hours, bool) or not isinstance(hours, int) or not 1 <= hours <= MAX_BOOKING_HOURS:
        raise ValueError(
            f"hours must be a whole number from 1 to {MAX_BOOKING_HOURS}, not {hours!r}; "
            "for longer sessions, talk to the office manager"
        )
    try:
        day = dt.date.fromisoformat(str(date))
    except ValueError:
        raise ValueError(f"date must be in ISO format YYYY-MM-DD, e.g. '2026-12-03', not {date!r}") from None
    if day.weekday() >= 5:
        raise ValueError(f"{day.isoformat()} is a {day:%A}: the offices are open on working days only")
    opens, closes = (dt.datetime.combine(day, t) for t in OPENING_HOURS[ROOMS[room]])
    with _bookings_lock:
        taken = sum(b["hours"] for b in _bookings if b["room"] == room and b["date"] == day.isoformat())
        start = opens + dt.timedelta(hours=taken)
        end = start + dt.timedelta(hours=hours)
        if end > closes:
            free = max((closes - start).total_seconds() / 3600, 0)
            raise ValueError(
                f"{room} cannot be booked for {hours} hours on {day.isoformat()}: only {free:g} hours are "
                "still free that day; choose fewer hours, another room or another date"
            )
        booking = {
            "booked": True,
            "booking_id": f"BK-{_FIRST_BOOKING_NUMBER + len(_bookings)}",
            "room": room,
            "date": day.isoformat(),
            "hours": hours,
            "start": f"{start:%H:%M}",
            "end": f"{end:%H:%M}",
        }
        _bookings.append(booking)
    return dict(booking)


def bookings() -> pd.DataFrame:
    """Every booking made in this session, one row each (booking_id, room, date, hours, start, end)."""
    columns = ["booking_id", "room", "date", "hours", "start", "end"]
    with _bookings_lock:
        return pd.DataFrame([{c: b[c] for c in columns} for b in _bookings], columns=columns)


def reset_bookings() -> None:
    """Forget every booking (all rooms are free again)."""
    with _bookings_lock:
        _bookings.clear()


def company_tools() -> list[Tool]:
    """The company's tools, in the order of data/tools.json: pass them to `llmlab.tools.run`.

    >>> [t.schema for t in company_tools()] == tool_definitions()
    True
    """
    return [get_leave_balance, find_employee, book_meeting_room]


# ------------------------------------------------------------------------------------------ data files
def tool_definitions() -> list[dict]:
    """The tool definitions of data/tools.json (OpenAI's `tools` list), as a model would receive them."""
    data = json.loads((DATA_DIR / "tools.json").read_text(encoding="utf-8"))
    return data["tools"] if isinstance(data, dict) else data


def system_prompt() -> str:
    """The assistant's system prompt, as in the tool-call examples of data/tools_train.jsonl.

    >>> system_prompt().startswith("You are the assistant of Fernhollow Instruments.")
    True
    """
    return read_jsonl("tools_train.jsonl")[0]["messages"][0]["content"]
