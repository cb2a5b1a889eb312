"""The current date and time, in UTC or in an IANA time zone (``zoneinfo``)."""

from __future__ import annotations

from datetime import datetime, timezone as dt_timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

NAME = "current_time"
DESCRIPTION = ("Get the current date, time and weekday. Without a time zone the answer is in UTC; "
               "pass an IANA time zone name such as \"Asia/Shanghai\", \"Europe/Berlin\" or "
               "\"America/New_York\" for local time there.")
PARAMETERS = {
    "type": "object",
    "properties": {
        "timezone": {"type": "string", "minLength": 1, "maxLength": 64,
                     "description": "IANA time zone name, e.g. Asia/Shanghai; default UTC"},
    },
    "required": [],
    "additionalProperties": False,
}

ALIASES = {"utc": "UTC", "gmt": "UTC", "z": "UTC"}


def zone(name: str) -> ZoneInfo:
    """The zone called ``name``; ValueError naming it when there is no such IANA zone."""
    key = ALIASES.get(name.strip().lower(), name.strip())
    try:
        return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as 'Asia/Shanghai', "
                         "'Europe/London' or 'UTC'") from None


def describe(moment: datetime) -> dict:
    offset = moment.strftime("%z")
    return {
        "timezone": str(moment.tzinfo),
        "datetime": moment.isoformat(timespec="seconds"),
        "date": moment.date().isoformat(),
        "time": moment.strftime("%H:%M:%S"),
        "weekday": moment.strftime("%A"),
        "utc_offset": f"{offset[:3]}:{offset[3:]}",
        "unix_time": int(moment.timestamp()),
    }


def run(timezone: str = "UTC") -> dict:
    return describe(datetime.now(dt_timezone.utc).astimezone(zone(timezone)))
