"""The caps on reading a document: past any of them the document is refused with a message naming the cap.

    FILE_BYTES       20 MB       the uploaded file itself (checked before anything is parsed)
    PAGES            500         pages of a PDF (the page tree is counted before pypdf walks it)
    CHARS            2,000,000   characters of extracted text (about 500k–1.3M tokens: far past any context)
    SECONDS          30          wall-clock time of the worker process, start-up included; then it is killed.
                                 Its CPU time is capped at the same number (RLIMIT_CPU) in case the parent is gone.
    MEMORY_BYTES     512 MiB     the worker's address space (RLIMIT_AS): a bomb gets MemoryError, not the machine
    UNZIPPED_BYTES   100 MiB     what a .docx's members declare they unpack to, all together
    ZIP_RATIO        100         unpacked / packed size of a .docx member over ZIP_RATIO_FROM (1 MiB) unpacked;
                                 Word's XML packs 5-20:1, a zip bomb 1000:1
    ZIP_MEMBERS      10,000      members of a .docx

A .docx's declared sizes are checked before anything in it is unpacked; then each member is unpacked in small
reads, which Python's zipfile stops at the declared size (a member that lies fails its CRC check: "damaged"),
before python-docx opens it. So the declared sizes bound what is unpacked. pypdf's own caps (75 MB per
decompressed stream, among others) stay in force inside the worker.

``Limits`` holds one set of them; ``LIMITS`` is the one in force. Tests pass smaller ones to ``extract``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MB = 1_000_000
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    file_bytes: int = 20 * MB
    pages: int = 500
    chars: int = 2_000_000
    seconds: float = 30.0
    memory_bytes: int = 512 * MiB
    unzipped_bytes: int = 100 * MiB
    zip_ratio: int = 100
    zip_ratio_from: int = 1 * MiB
    zip_members: int = 10_000

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Limits:
        return cls(**data)


LIMITS = Limits()


def megabytes(n: int) -> str:
    """20000000 -> '20 MB', 1234567 -> '1.2 MB' (decimal megabytes, as file sizes are shown)."""
    value = n / MB
    return f"{value:.0f} MB" if value >= 10 or value == int(value) else f"{value:.1f} MB"


def mebibytes(n: int) -> str:
    """536870912 -> '512 MiB', 4294967296 -> '4,096 MiB'."""
    return f"{n / MiB:,.0f} MiB"
