"""The protocol fuzzer: a hostile vfio-user client, structure-aware and driven by hypothesis'
stateful testing, against `vdsa serve` running the sanitized engine and the sanitized
libvfio-user.

Why hypothesis rather than a byte-level fuzzing engine: the messages that matter are
well-formed enough to reach the handlers (a DMA_MAP that overlaps the third of five live maps,
an unmap that cuts one, a region access one byte past the end), which needs the message
layouts and a model of the server's state; hypothesis' rule-based state machines carry both,
shrink a failure to the shortest sequence of messages, and replay it from a seed.

Failure is any of: the server process ends, a reply does not come (a hang), a sanitizer
reports (the sanitized builds abort on their first finding), an invalid message gets a success
reply, a connection leaves file descriptors behind, or the server's memory keeps growing.
"""
