"""The simulated device's resources as a pure model: representations, changes, links, batches.

Nothing here does I/O or reads a clock: times come in as ``now_ns``. :mod:`devicesim.site`
serves this model over CoAP; :mod:`devicesim.device` drives its changes.

User resources are lights at ``/light/1`` … ``/light/R`` with the representation
``{"state": bool, "power": int, "seq": int, "ts": int}``: ``seq`` counts changes, ``ts`` is the
epoch-nanosecond time of the last change, so a benchmark can measure end-to-end latency.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from devicesim import ocf
from devicesim.config import BatchSupport

LIGHT_RT: Final = ("core.light",)
LIGHT_IFS: Final = (ocf.IF_RW, ocf.IF_BASELINE)
# Properties the device owns: an update naming them is refused.
READ_ONLY: Final = frozenset({"seq", "ts", "rt", "if", "n", "id"})
MAX_POWER: Final = 100


class UpdateRejected(ValueError):
    """A POST payload the resource refuses (answered 4.00 with this message)."""


@dataclass(frozen=True, slots=True)
class ResourceInfo:
    href: str
    rt: tuple[str, ...]
    interfaces: tuple[str, ...]
    observable: bool
    discoverable: bool = True
    published: bool = True  # in the links of POST /oic/rd

    @property
    def bm(self) -> int:
        return (ocf.BM_DISCOVERABLE if self.discoverable else 0) | (
            ocf.BM_OBSERVABLE if self.observable else 0
        )


class DeviceModel:
    """State of one device: its platform and device info plus ``resources`` lights."""

    def __init__(
        self,
        *,
        device_id: str,
        name: str,
        resources: int,
        batch: BatchSupport = BatchSupport.OBSERVE,
        now_ns: int = 0,
        eps: tuple[str, ...] = (),
        introspection: bool = False,
    ) -> None:
        self.device_id = device_id
        self.name = name
        self.batch_support = batch
        self.eps = eps
        self._info: dict[str, ResourceInfo] = {
            ocf.RES: ResourceInfo(
                ocf.RES,
                ("oic.wk.res",),
                (ocf.IF_LL, ocf.IF_BATCH, ocf.IF_BASELINE),
                observable=batch is BatchSupport.OBSERVE,
            ),
            ocf.DEVICE: ResourceInfo(
                ocf.DEVICE, ("oic.wk.d",), (ocf.IF_R, ocf.IF_BASELINE), observable=False
            ),
            ocf.PLATFORM: ResourceInfo(
                ocf.PLATFORM, ("oic.wk.p",), (ocf.IF_R, ocf.IF_BASELINE), observable=False
            ),
        }
        if introspection:  # discovered, never published, answers 4.00 (see devicesim.site)
            self._info[ocf.INTROSPECTION] = ResourceInfo(
                ocf.INTROSPECTION,
                ("oic.wk.introspection",),
                (ocf.IF_R, ocf.IF_BASELINE),
                observable=False,
                published=False,
            )
        self._lights: dict[str, dict[str, Any]] = {}
        for i in range(1, resources + 1):
            href = f"/light/{i}"
            self._info[href] = ResourceInfo(href, LIGHT_RT, LIGHT_IFS, observable=True)
            self._lights[href] = {"state": False, "power": 0, "seq": 0, "ts": now_ns}
        self.user_hrefs: tuple[str, ...] = tuple(self._lights)
        self._next = 0

    # --- reading ------------------------------------------------------------------------------

    def info(self, href: str) -> ResourceInfo:
        return self._info[href]

    def has(self, href: str) -> bool:
        return href in self._info

    @property
    def hrefs(self) -> tuple[str, ...]:
        return tuple(self._info)

    def device_info(self) -> dict[str, Any]:
        return {
            "di": self.device_id,
            "n": self.name,
            "piid": self.device_id,
            "icv": "ocf.2.0.5",
            "dmv": "ocf.res.1.3.0,ocf.sh.1.3.0",
        }

    def platform_info(self) -> dict[str, Any]:
        return {"pi": self.device_id, "mnmn": "twinhub devicesim"}

    def representation(self, href: str, *, baseline: bool = False) -> dict[str, Any]:
        """The resource's value; ``baseline`` adds ``rt`` and ``if`` (oic.if.baseline)."""
        if href in self._lights:
            rep = dict(self._lights[href])
        elif href == ocf.DEVICE:
            rep = self.device_info()
        elif href == ocf.PLATFORM:
            rep = self.platform_info()
        elif href == ocf.RES:
            rep = {"links": self.links()}
        else:
            raise KeyError(href)
        if baseline:
            info = self._info[href]
            rep["rt"] = list(info.rt)
            rep["if"] = list(info.interfaces)
        return rep

    def links(self, *, rt: str | None = None) -> list[dict[str, Any]]:
        """Discovery links (``/oic/res`` with oic.if.ll), optionally only those with type ``rt``."""
        out: list[dict[str, Any]] = []
        for info in self._info.values():
            if rt is not None and rt not in info.rt:
                continue
            link: dict[str, Any] = {
                "anchor": f"ocf://{self.device_id}",
                "href": info.href,
                "rt": list(info.rt),
                "if": list(info.interfaces),
                "p": {"bm": info.bm},
            }
            if self.eps:
                link["eps"] = [{"ep": ep} for ep in self.eps]
            out.append(link)
        return out

    def publish_links(self) -> list[dict[str, Any]]:
        """The links of ``POST /oic/rd``: the discovery links of the published resources, with
        instance numbers 1..n."""
        links = [link for link in self.links() if self._info[link["href"]].published]
        for ins, link in enumerate(links, start=1):
            link["ins"] = ins
        return links

    def batch(self, hrefs: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The batch representation (``oic.if.b``): ``[{"href": "ocf://<di>/<path>", "rep"}]``.

        ``None`` means every resource with a representation but ``/oic/res`` itself; reps are
        baseline (with rt/if).
        """
        if hrefs is None:
            selected = [h for h in self._info if h not in (ocf.RES, ocf.INTROSPECTION)]
        else:
            selected = list(hrefs)
        return [
            {
                "href": f"ocf://{self.device_id}{h}",
                "rep": self.representation(h, baseline=True),
            }
            for h in selected
        ]

    # --- changing -----------------------------------------------------------------------------

    def next_href(self) -> str | None:
        """The light whose turn it is to change (round-robin); ``None`` without lights."""
        if not self.user_hrefs:
            return None
        href = self.user_hrefs[self._next % len(self.user_hrefs)]
        self._next += 1
        return href

    def simulate_change(self, href: str, now_ns: int, rng: random.Random) -> dict[str, Any]:
        """What the physical world does to a light: flip it, new power draw."""
        rep = self._lights[href]
        rep["state"] = not rep["state"]
        rep["power"] = rng.randint(1, MAX_POWER) if rep["state"] else 0
        return self._touch(href, now_ns)

    def apply_update(self, href: str, payload: Any, now_ns: int) -> dict[str, Any]:
        """Apply a POST: every given key is set; returns the new representation."""
        if href not in self._lights:
            raise UpdateRejected(f"{href} is read-only")
        if not isinstance(payload, Mapping) or not payload:
            raise UpdateRejected("update must be a non-empty map")
        for key, value in payload.items():
            if not isinstance(key, str):
                raise UpdateRejected("property names must be strings")
            if key in READ_ONLY:
                raise UpdateRejected(f"property {key!r} is read-only")
            if key == "state" and not isinstance(value, bool):
                raise UpdateRejected("'state' must be a boolean")
            if key == "power" and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise UpdateRejected("'power' must be a non-negative integer")
        self._lights[href].update(payload)
        return self._touch(href, now_ns)

    def _touch(self, href: str, now_ns: int) -> dict[str, Any]:
        rep = self._lights[href]
        rep["seq"] += 1
        rep["ts"] = now_ns
        return dict(rep)
