"""Unit conversion: length, mass, temperature, volume, speed, time and data size.

Every unit but the temperatures is a factor to its kind's base unit (metre, kilogram, litre,
metre per second, second, byte); temperatures are affine (through kelvin), so 0 °C is 32 °F.
"""

from __future__ import annotations

import math

NAME = "unit_conversion"

# kind -> unit symbol -> how many base units one of it is
FACTORS = {
    "length": {"m": 1.0, "km": 1e3, "cm": 1e-2, "mm": 1e-3, "um": 1e-6, "nm": 1e-9,
               "mi": 1609.344, "yd": 0.9144, "ft": 0.3048, "in": 0.0254, "nmi": 1852.0,
               "li": 500.0, "chi": 1 / 3},                    # 市里, 市尺
    "mass": {"kg": 1.0, "g": 1e-3, "mg": 1e-6, "t": 1e3, "lb": 0.45359237, "oz": 0.028349523125,
             "st": 6.35029318, "jin": 0.5, "liang": 0.05},    # 市斤, 两
    "volume": {"L": 1.0, "mL": 1e-3, "m3": 1e3, "cm3": 1e-3, "gal": 3.785411784, "qt": 0.946352946,
               "pt": 0.473176473, "cup": 0.2365882365, "fl_oz": 0.0295735295625, "imp_gal": 4.54609},
    "speed": {"m/s": 1.0, "km/h": 1 / 3.6, "mph": 0.44704, "kn": 1852 / 3600, "ft/s": 0.3048},
    "time": {"s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0, "h": 3600.0, "d": 86400.0,
             "wk": 604800.0, "yr": 31557600.0},                # Julian year, 365.25 days
    "data size": {"B": 1.0, "bit": 0.125, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
                  "KiB": 1024.0, "MiB": 1024.0 ** 2, "GiB": 1024.0 ** 3, "TiB": 1024.0 ** 4,
                  "kbit": 125.0, "Mbit": 125e3, "Gbit": 125e6},
}
# temperature unit -> (kelvin per degree, kelvin at 0 of the unit)
TEMPERATURES = {"C": (1.0, 273.15), "F": (5 / 9, 273.15 - 32 * 5 / 9), "K": (1.0, 0.0)}

KIND_OF = {unit: kind for kind, units in FACTORS.items() for unit in units} | dict.fromkeys(TEMPERATURES, "temperature")
UNITS = list(KIND_OF)

DESCRIPTION = ("Convert a value between units of the same kind: length, mass, temperature (C, F, K), volume, "
               "speed, time or data size. li/chi are 市里/市尺, jin/liang are 市斤/两; gal, qt, pt, cup and fl_oz "
               "are US measures, imp_gal the imperial gallon; yr is 365.25 days; kB/MB/GB/TB are powers of "
               "1000, KiB/MiB/GiB/TiB powers of 1024.")
PARAMETERS = {
    "type": "object",
    "properties": {
        "value": {"type": "number", "description": "the amount to convert"},
        "from_unit": {"type": "string", "enum": UNITS, "description": "the unit of value"},
        "to_unit": {"type": "string", "enum": UNITS, "description": "the unit to convert to"},
    },
    "required": ["value", "from_unit", "to_unit"],
    "additionalProperties": False,
}

SIGNIFICANT_DIGITS = 12  # hides float noise such as 0.30000000000000004


def kind_of(unit: str) -> str:
    kind = KIND_OF.get(unit)
    if kind is None:
        raise ValueError(f"unknown unit {unit!r}; known units: {', '.join(UNITS)}")
    return kind


def convert(value: float, from_unit: str, to_unit: str) -> float:
    source, target = kind_of(from_unit), kind_of(to_unit)
    if source != target:
        raise ValueError(f"cannot convert {source} ({from_unit}) to {target} ({to_unit})")
    if source == "temperature":
        scale, zero = TEMPERATURES[from_unit]
        kelvin = value * scale + zero
        if kelvin < -1e-9:
            raise ValueError(f"{value:g} {from_unit} is below absolute zero")
        kelvin = max(kelvin, 0.0)
        scale, zero = TEMPERATURES[to_unit]
        return (kelvin - zero) / scale
    return value * FACTORS[source][from_unit] / FACTORS[target][to_unit]


def run(value: float, from_unit: str, to_unit: str) -> dict:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"value must be a finite number, not {value!r}")
    result = convert(value, from_unit, to_unit)
    if not math.isfinite(result):
        raise ValueError("the result is too large")
    return {"value": value, "from_unit": from_unit, "to_unit": to_unit, "kind": kind_of(from_unit),
            "result": float(f"{result:.{SIGNIFICANT_DIGITS}g}")}
