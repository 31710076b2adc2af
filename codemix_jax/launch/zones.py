"""Which Google Cloud zones offer which TPU generation, so a launch into the wrong zone is refused
here rather than after a queued request has waited for capacity that zone never has.

Source: Cloud TPU documentation, "TPU regions and zones" (https://cloud.google.com/tpu/docs/regions-zones),
page last updated 2025-09-09. Zones are added over time: ``--allow_unlisted_zone`` launches into a
zone newer than this table.
"""

from __future__ import annotations

TABLE_DATE = "2025-09-09"

TPU_ZONES: dict[str, tuple[str, ...]] = {
    "v4": ("us-central2-b",),
    "v5e": ("us-central1-a", "us-south1-a", "us-west1-c", "us-west4-a"),
    "v5p": ("us-central1-a", "us-east5-a"),
    "v6e": ("us-central1-b", "us-east1-d", "us-east5-a", "us-east5-b", "europe-west4-a"),
}


def check_zone(*, generation: str, zone: str, allow_unlisted: bool = False) -> None:
    """Refuse ``zone`` unless the table lists it for ``generation`` (or ``allow_unlisted``)."""
    zones = TPU_ZONES.get(generation, ())
    if zone in zones or allow_unlisted:
        return
    raise ValueError(
        f"zone {zone!r} has no TPU {generation} in the zone table of {TABLE_DATE} "
        f"(codemix_jax/launch/zones.py); {generation} is in: {', '.join(zones)}. "
        "If the zone is newer than the table, pass --allow_unlisted_zone"
    )
