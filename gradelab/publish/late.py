"""Late policy: how late a submission was, and what the policy would take off.

The policy itself (`config.LatePolicy`) is configuration; this module applies it.

`assess` computes and explains the penalty but never changes a score; `apply_late` is the one
place a penalty is subtracted, and exports call it so the LMS gets the penalised score while the
plain CSV shows raw score, penalty and final score side by side.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from gradelab.config import LatePolicy
from gradelab.boundary.records import LateInfo, SubmissionResult

SECONDS_PER_DAY = 86_400.0


def assess(
    policy: LatePolicy,
    *,
    student_id: str,
    submitted_at: datetime | None,
    marked_late: bool,
    max_score: float,
) -> LateInfo:
    """Lateness from the timestamp when there is one, else from the LMS's late marker."""
    caveats: list[str] = []  # how the verdict was reached; appended to the reason
    due = _due_for(policy, student_id, caveats)
    submitted = _as_utc(submitted_at, caveats) if submitted_at else None
    seconds_late, fraction = 0.0, 0.0

    if submitted is not None and due is not None:
        seconds_late = max(0.0, (submitted - due).total_seconds())
        grace = policy.grace_minutes * 60
        if seconds_late == 0:
            reason = "on time"
        elif seconds_late <= grace:
            reason = (
                f"submitted {format_duration(seconds_late)} late, inside the "
                f"{policy.grace_minutes:g} min grace: no penalty"
            )
        else:
            days = math.ceil((seconds_late - grace) / SECONDS_PER_DAY)
            reason = f"submitted {format_duration(seconds_late)} late"
            if grace:
                reason += f" ({_days(days)} started after the {policy.grace_minutes:g} min grace)"
            fraction, rule = _penalty(policy, days, max_score)
            reason += f"; {rule}"
        if marked_late and seconds_late <= grace:
            caveats.append("the LMS marked it late; the timestamp wins")
    elif marked_late:
        missing = "without a timestamp" if submitted is None else "and there is no due date to measure against"
        fraction, rule = _penalty(policy, 1, max_score)
        reason = f"marked late by the LMS {missing}: lateness unknown, counted as 1 day; {rule}"
        if student_id in policy.extensions:
            caveats.append("the LMS may not know of this student's extension: check by hand")
    else:
        reason = "on time" if due is not None else "no due date"

    if caveats:
        reason += f" ({'; '.join(caveats)})"
    return LateInfo(
        submitted_at=submitted,
        marked_late=marked_late,
        seconds_late=seconds_late,
        penalty_fraction=fraction,
        penalty_points=round(fraction * max_score, 4),
        reason=reason,
    )


def is_late(info: LateInfo | None) -> bool:
    """Whether the submission counts as late: measured late, marked late, or penalised."""
    return info is not None and (info.marked_late or info.seconds_late > 0 or info.penalty_points > 0)


def apply_late(result: SubmissionResult, info: LateInfo | None) -> float:
    """The score after the late penalty, never below zero."""
    if info is None:
        return result.score
    return max(0.0, result.score - info.penalty_points)


def format_points(value: float) -> str:
    """A score as LMS files and messages show it: at most 2 decimals, no trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def format_duration(seconds: float) -> str:
    """The two largest units of a duration: "1 day 2 h", "3 days", "2 h 5 min", "40 s"."""
    days, rest = divmod(int(seconds // 60), 24 * 60)
    hours, minutes = divmod(rest, 60)
    parts = [_days(days) if days else "", f"{hours} h" if hours else "", f"{minutes} min" if minutes else ""]
    shown = [part for part in parts if part][:2]
    return " ".join(shown) or f"{int(seconds)} s"


def _days(days: int) -> str:
    return f"{days} day" if days == 1 else f"{days} days"


def _penalty(policy: LatePolicy, days: int, max_score: float) -> tuple[float, str]:
    """The fraction of the max score taken off for `days` started days late, and why."""
    if policy.penalty == "none":
        return 0.0, "late policy 'none': no penalty"
    if policy.penalty == "zero":
        fraction, rule = 1.0, "late policy 'zero'"
    elif policy.max_days is not None and days > policy.max_days:
        fraction, rule = 1.0, f"more than {_days(policy.max_days)} late, score set to 0"
    else:
        fraction = round(min(1.0, days * policy.per_day_fraction), 6)  # 3 x 0.1 is 0.30000000000000004
        rule = f"{_days(days)} x {policy.per_day_fraction * 100:g}%"
    return fraction, f"{rule}: -{fraction * 100:g}% = -{format_points(fraction * max_score)} points"


def _due_for(policy: LatePolicy, student_id: str, caveats: list[str]) -> datetime | None:
    extension = policy.extensions.get(student_id)
    if isinstance(extension, datetime):
        extended = _as_utc(extension, caveats)
        caveats.append(f"extended due date {extended:%Y-%m-%d %H:%M} UTC")
        return extended
    due = _as_utc(policy.due, caveats) if policy.due else None
    if extension and due is not None:
        caveats.append(f"extension of {extension:g} days")
        return due + timedelta(days=extension)
    return due


def _as_utc(moment: datetime, caveats: list[str]) -> datetime:
    if moment.tzinfo is None:
        note = "times without a timezone taken as UTC"
        if note not in caveats:
            caveats.append(note)
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
