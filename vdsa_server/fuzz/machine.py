"""The hostile client as a hypothesis state machine: each rule sends one kind of message with
fields drawn to hit the server's checks, judges the reply against the vfio-user
specification (and, for DMA, VFIO's type1 rules), and tracks the state later messages depend
on (the live DMA maps).  Between examples the server must be alive, serve a new client, and
have closed every file descriptor the last one gave it."""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar, cast

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from vdsa_server.client.protocol import (
    HEADER_SIZE,
    Command,
    Header,
    HeaderFlag,
    MessageType,
    command_name,
    decode_device_info,
    decode_region_info,
    encode_device_get_info,
    encode_device_get_region_info,
    encode_message,
)
from vdsa_server.fuzz import messages as m
from vdsa_server.fuzz.connection import Connection, Dropped, Reply, ServerHung
from vdsa_server.fuzz.target import FuzzTarget

FD_SETTLE = 2.0  # for the server to drop a closed connection's fds
DEATH_SETTLE = 2.0  # for a server whose socket failed to show that it has ended
PCI_VENDOR_ID_INTEL = 0x8086
DMA_R, DMA_W = 1, 2
UNMAP_ALL = 2


class FuzzFailure(AssertionError):
    """The server broke a rule; the message says which."""


@dataclass
class Tally:
    """What the fuzzing reached: messages by command, oracle label and outcome (with errno);
    examples run; the server's memory after each."""

    examples: int = 0
    messages: int = 0
    outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    rss: list[int] = field(default_factory=list)
    # The first failure as it happened, with its example's steps: hypothesis' own replay of a
    # failing example meets a server whose state has moved on and can end differently.
    failure: str | None = None
    failing_steps: list[str] = field(default_factory=list)

    def count(self, command: str, valid: bool | None, outcome: str) -> None:
        self.messages += 1
        label = {True: "valid", False: "invalid", None: "unjudged"}[valid]
        if command.startswith("command "):
            command = "unknown command"
        self.outcomes[command, label, outcome] += 1


_Rule = TypeVar("_Rule", bound=Callable[..., None])
STEP_TEXT = 300  # characters of a step's arguments kept for the report


def recorded(body: _Rule) -> _Rule:
    """Keep each step of an example, and the first failure with the steps that led to it."""

    @functools.wraps(body)
    def step(self: ProtocolMachine, **fields: object) -> None:
        self.steps.append(f"{body.__name__}({fields})"[:STEP_TEXT])
        try:
            body(self, **fields)
        except Exception as failed:
            if self.tally.failure is None:
                self.tally.failure = repr(failed)
                self.tally.failing_steps = list(self.steps)
            raise

    return cast(_Rule, step)


def _open_fd(kind: str, stack: ExitStack) -> int:
    if kind == "memfd":
        fd = os.memfd_create("vdsa-fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, m.MEMFD_PAGES * m.PAGE)
    elif kind == "pipe":
        fd, other = os.pipe()
        stack.callback(os.close, other)
    elif kind == "eventfd":
        fd = os.eventfd(0, os.EFD_CLOEXEC)
    else:
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    return fd


@dataclass(frozen=True)
class Interval:
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size

    def overlaps(self, other: Interval) -> bool:
        return self.start < other.end and other.start < self.end

    def contains(self, other: Interval) -> bool:
        return self.start <= other.start and other.end <= self.end


class ProtocolMachine(RuleBasedStateMachine):
    # Set by the runner before any example: one server serves every example of a run.
    target: ClassVar[FuzzTarget]
    tally: ClassVar[Tally]
    region_sizes: ClassVar[dict[int, int]] = {}
    baseline_fds: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        self._connection: Connection | None = None
        self._msg_id = 0
        self.maps: list[Interval] = []
        self.steps: list[str] = []

    # --- The connection and the oracle ---------------------------------------------------

    def connection(self) -> Connection:
        if self._connection is None:
            self.target.check_alive()
            try:
                with ExitStack() as undo:
                    connection = undo.enter_context(Connection(self.target.socket))
                    connection.handshake()
                    undo.pop_all()
                self._connection = connection
            except (OSError, Dropped, ServerHung) as failed:
                self.target.check_alive(settle=DEATH_SETTLE)
                raise FuzzFailure(f"a new connection failed: {failed!r}") from failed
            self.maps = []
        return self._connection

    def hang_up(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self.maps = []

    def next_id(self) -> int:
        self._msg_id = (self._msg_id + 1) & 0xFFFF
        return self._msg_id

    def ask(self, command: int, payload: bytes, valid: bool | None, *,
            fds: Sequence[str] = ()) -> Reply | None:
        """Send one message and judge its reply: None if the server dropped the connection
        (acceptable only for a message that is not valid)."""
        name = command_name(command)
        msg_id = self.next_id()
        message = Header(msg_id, command, HEADER_SIZE + len(payload)).encode() + payload
        with ExitStack() as stack:
            numbers = [_open_fd(kind, stack) for kind in fds]
            try:
                reply = self.connection().exchange(msg_id, command, message, numbers)
            except Dropped:
                self.tally.count(name, valid, "dropped")
                self.hang_up()
                self.target.check_alive(settle=DEATH_SETTLE if valid else 0.0)
                if valid:
                    raise FuzzFailure(f"a valid {name} ended the connection: "
                                          f"{payload.hex()}") from None
                return None
            except ServerHung:
                self.target.check_alive(settle=DEATH_SETTLE)
                raise FuzzFailure(f"no reply to {name} within the limit: the server "
                                      f"hangs; {self.target.describe_log()}") from None
        outcome = "ok" if reply.errno == 0 else f"errno {reply.errno}"
        self.tally.count(name, valid, outcome)
        if valid is False and reply.errno == 0:
            raise FuzzFailure(f"an invalid {name} got a success reply: {payload.hex()} "
                                  f"with fds {list(fds)}")
        return reply

    # --- Rules ------------------------------------------------------------------------------

    @rule(region=m.region_indexes(), offset=m.u64(), count=m.counts(), write=st.booleans(),
          data=st.data())
    @recorded
    def region_access(self, region: int, offset: int, count: int, write: bool,
                      data: st.DataObject) -> None:
        access = m.region_access(region, offset, count)
        body = bytes(count) if write and count <= 8192 else b""
        payload = data.draw(m.truncations(access + body))
        size = self.region_sizes.get(region, 0)
        in_bounds = 0 < count <= m.MAX_DATA_XFER and offset + count <= size
        if len(payload) < len(access):
            valid: bool | None = False
        elif write:
            valid = in_bounds and len(payload) == len(access) + count
        else:
            # libvfio-user ignores bytes after a read's access header.
            valid = in_bounds if len(payload) == len(access) else (False if not in_bounds
                                                                    else None)
        self.ask(Command.REGION_WRITE if write else Command.REGION_READ, payload, valid)

    @rule(window=m.window_pages(), anywhere=st.one_of(st.none(), st.tuples(m.u64(), m.u64())),
          flags=st.one_of(st.sampled_from([DMA_R, DMA_W, DMA_R | DMA_W, 0]), m.u32()),
          offset=st.one_of(st.sampled_from([0, m.PAGE, m.PAGE // 2]), m.u64()),
          argsz=st.one_of(st.just(32), m.u32()), fds=m.fd_lists(), data=st.data())
    @recorded
    def dma_map(self, window: tuple[int, int], anywhere: tuple[int, int] | None, flags: int,
                offset: int, argsz: int, fds: list[str], data: st.DataObject) -> None:
        if anywhere is None:
            address, size = m.WINDOW + window[0] * m.PAGE, window[1] * m.PAGE
        else:
            address, size = anywhere
        exact = m.dma_map(argsz, flags, offset, address, size)
        payload = data.draw(m.truncations(exact))
        wanted = Interval(address, size)
        fits_file = offset + size <= m.MEMFD_PAGES * m.PAGE
        valid = (len(payload) >= len(exact) and argsz >= 32 and not flags & ~(DMA_R | DMA_W)
                 and size > 0 and address + size <= m.U64 + 1
                 and not any(wanted.overlaps(live) for live in self.maps)
                 and (fds == [] or (fds == ["memfd"] and fits_file)))
        reply = self.ask(Command.DMA_MAP, payload, valid, fds=fds)
        if reply is not None and reply.errno == 0:
            self.maps.append(wanted)

    @rule(window=m.window_pages(), anywhere=st.one_of(st.none(), st.tuples(m.u64(), m.u64())),
          flags=st.one_of(st.sampled_from([0, 0, 1, UNMAP_ALL]), m.u32()),
          argsz=st.one_of(st.just(24), m.u32()), data=st.data())
    @recorded
    def dma_unmap(self, window: tuple[int, int], anywhere: tuple[int, int] | None, flags: int,
                  argsz: int, data: st.DataObject) -> None:
        if flags == UNMAP_ALL and data.draw(st.booleans()):
            address = size = 0
        elif anywhere is None:
            address, size = m.WINDOW + window[0] * m.PAGE, window[1] * m.PAGE
        else:
            address, size = anywhere
        exact = m.dma_unmap(argsz, flags, address, size)
        payload = data.draw(m.truncations(exact))
        span = Interval(address, size)
        inside = [live for live in self.maps if span.contains(live)]
        cut = [live for live in self.maps if span.overlaps(live) and live not in inside]
        well_formed = len(payload) >= len(exact) and len(exact) <= argsz <= m.MAX_DATA_XFER
        valid: bool | None
        if flags == 0:
            # type1's rules: nothing mapped there is success; the range may end at 2^64.
            valid = well_formed and not cut and size > 0 and address + size <= 1 << 64
        elif flags == UNMAP_ALL:
            valid = well_formed and address == size == 0
        else:
            valid = None if flags == 1 else False  # 1: a dirty bitmap, which nothing logs
        reply = self.ask(Command.DMA_UNMAP, payload, valid)
        if reply is not None and reply.errno == 0:
            self.maps = [] if flags == UNMAP_ALL else [
                live for live in self.maps if live not in inside]

    @rule(index=m.region_indexes(), argsz=st.one_of(st.just(32), m.u32()), data=st.data())
    @recorded
    def region_info(self, index: int, argsz: int, data: st.DataObject) -> None:
        exact = m.region_info(argsz, index)
        payload = data.draw(m.truncations(exact))
        if len(payload) < len(exact) or argsz < len(exact):
            valid: bool | None = False
        else:
            valid = index < len(self.region_sizes)
        self.ask(Command.DEVICE_GET_REGION_INFO, payload, valid)

    @rule(index=st.one_of(st.integers(0, m.VFIO_PCI_NUM_IRQS), m.u32()),
          argsz=st.one_of(st.just(16), m.u32()), data=st.data())
    @recorded
    def irq_info(self, index: int, argsz: int, data: st.DataObject) -> None:
        exact = m.irq_info(argsz, index)
        payload = data.draw(m.truncations(exact))
        if len(payload) < len(exact) or argsz < len(exact):
            valid: bool | None = False
        else:
            valid = index < m.VFIO_PCI_NUM_IRQS
        self.ask(Command.DEVICE_GET_IRQ_INFO, payload, valid)

    @rule(index=st.one_of(st.integers(0, m.VFIO_PCI_NUM_IRQS), m.u32()), flags=m.u32(),
          start=st.one_of(st.integers(0, 16), m.u32()),
          count=st.one_of(st.integers(0, 16), m.u32()), fds=m.fd_lists(), data=st.data())
    @recorded
    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[str],
                 data: st.DataObject) -> None:
        exact = m.set_irqs(20 + 4 * len(fds), flags, index, start, count)
        payload = data.draw(m.truncations(exact))
        valid = False if index >= m.VFIO_PCI_NUM_IRQS else None
        self.ask(Command.DEVICE_SET_IRQS, payload, valid, fds=fds)

    @rule()
    @recorded
    def device_reset(self) -> None:
        self.ask(Command.DEVICE_RESET, b"", True)

    @rule(command=st.one_of(st.sampled_from([Command.VERSION, Command.DMA_READ,
                                             Command.DMA_WRITE, 0]),
                            st.integers(Command.REGION_WRITE_MULTI, 0xFFFF)),
          payload=st.binary(min_size=1, max_size=64))
    @recorded
    def command_a_server_never_takes(self, command: int, payload: bytes) -> None:
        self.ask(command, payload, False)

    @rule(command=st.sampled_from(list(Command)), flags=m.u32(),
          size=st.one_of(st.integers(0, HEADER_SIZE + 64), m.u32()),
          payload=st.binary(max_size=64))
    @recorded
    def header_of_any_shape(self, command: int, flags: int, size: int, payload: bytes) -> None:
        """A header whose type, flags or size lie; its reply (or the hang-up) is read, then the
        connection is dropped: what follows a lying size is out of step."""
        flags = int(flags & ~HeaderFlag.NO_REPLY)
        if flags & 0xF == int(MessageType.COMMAND) and not flags & ~0xF:
            flags |= MessageType.REPLY  # always wrong somewhere
        message = Header(self.next_id(), command, size & m.U32, flags).encode() + payload
        try:
            self.connection().send(message)
        except Dropped:
            self.tally.count("header", False, "dropped")
        self.tally.count("header", False, "sent")
        self.hang_up()
        self.target.check_alive()

    @rule(command=st.sampled_from(list(Command)), payload=st.binary(max_size=96),
          keep=st.integers(0, HEADER_SIZE + 96))
    @recorded
    def hang_up_mid_message(self, command: int, payload: bytes, keep: int) -> None:
        message = encode_message(self.next_id(), command, payload)
        with suppress(Dropped):
            self.connection().send(message[:keep])
        self.tally.count("hang-up", None, "sent")
        self.hang_up()
        self.target.check_alive()

    @rule(payload=st.binary(min_size=1, max_size=256))
    @recorded
    def no_reply_requested(self, payload: bytes) -> None:
        """A command that asks for no reply, followed by one that needs one: the next reply
        must be that one's (no stray reply, no lost sync)."""
        connection = self.connection()
        message = encode_message(self.next_id(), Command.REGION_WRITE, payload,
                                 flags=HeaderFlag.NO_REPLY)
        try:
            connection.send(message)
        except Dropped:
            self.hang_up()
            self.target.check_alive()
            return
        self.tally.count("no-reply", None, "sent")
        read = m.region_access(m.CONFIG_REGION, 0, 2)
        self.ask(Command.REGION_READ, read, True)

    @recorded
    def teardown(self) -> None:
        self.hang_up()
        check_serves(self.target)
        check_fds_settle(self.target, self.baseline_fds)
        self.tally.examples += 1
        self.tally.rss.append(self.target.sample().rss_bytes)


def check_serves(target: FuzzTarget) -> None:
    """A new client gets the handshake and reads the vendor id."""
    target.check_alive()
    try:
        with Connection(target.socket) as connection:
            connection.handshake()
            reply = connection.exchange(1, Command.REGION_READ, encode_message(
                1, Command.REGION_READ, m.region_access(m.CONFIG_REGION, 0, 2)))
    except (Dropped, ServerHung, OSError) as failed:
        target.check_alive(settle=DEATH_SETTLE)
        raise FuzzFailure(f"the server no longer serves a new client: {failed}; "
                          f"{target.describe_log()}") from failed
    vendor = int.from_bytes(reply.payload[16:18], "little")
    if reply.errno or vendor != PCI_VENDOR_ID_INTEL:
        raise FuzzFailure(f"a new client reads vendor id {vendor:#x} (errno {reply.errno})")


def check_fds_settle(target: FuzzTarget, baseline: int) -> None:
    deadline = time.monotonic() + FD_SETTLE
    while (count := target.sample().open_fds) > baseline:
        if time.monotonic() > deadline:
            raise FuzzFailure(f"the server holds {count} fds, {count - baseline} more than "
                              f"before the connection: a leak")
        time.sleep(0.01)


def discover(target: FuzzTarget) -> dict[int, int]:
    """Every region's size, as a well-behaved client asks for them."""
    sizes = {}
    with Connection(target.socket) as connection:
        connection.handshake()
        info = connection.exchange(1, Command.DEVICE_GET_INFO, encode_message(
            1, Command.DEVICE_GET_INFO, encode_device_get_info()))
        for index in range(decode_device_info(info.payload).num_regions):
            reply = connection.exchange(index + 2, Command.DEVICE_GET_REGION_INFO,
                                        encode_message(index + 2,
                                                       Command.DEVICE_GET_REGION_INFO,
                                                       encode_device_get_region_info(index)))
            sizes[index] = decode_region_info(reply.payload).size if not reply.errno else 0
    return sizes


def outcome_lines(tally: Tally) -> Iterator[str]:
    for (command, label, outcome), count in sorted(tally.outcomes.items()):
        yield f"{command:<24} {label:<9} {outcome:<12} {count}"
