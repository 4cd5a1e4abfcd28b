"""The only package that speaks Redis (and the only one that imports ``redis``).

The modules, each owning one concern::

    keys        Keys: every key name (events, rejected, dead, sessions, ...)
                and the persist consumer group's name
    functions   the function library (store.lua, loaded again whenever Redis
                lost it), the FN_* names, the typed KEYS/ARGV of each
                function, and the templates of the server-made records
                Lua completes (session.end, client.identify)
    resp        commands packed in RESP by hand, for the publish path
    replies     every Redis reply parsed into a typed value, once
    client      client factories, exchange() on one connection, and OUTAGE:
                the one tuple of exceptions meaning "Redis is away"
    publisher   Store: the publish lanes (Frame, FrameSink, submit), function
                calls and the server's look-ups
    cluster     function calls node by node on a cluster, on_key_node, CLUSTER_READS
    streams     StreamsReader, read_page, stream_end, redis_time_ms, site summaries
    groups      ConsumerGroup: every Redis call of the persist worker
    privacy     Subjects (keyed hashes), aliases and suppressed sets, forget's
                search of every stream, the audit stream

Dependencies point one way: ``keys``, ``functions``, ``replies`` and
``client`` import no other module here, ``resp`` only ``functions``,
``cluster`` those, ``streams`` and ``groups`` ``cluster``, and
``publisher`` the rest. Other rooms import from this package, never from a
module of it, so the layout can change behind these names.
"""

from eventwire.core.frames import COUNT_ONLY, EVENT, REJECT, REJECT_ALWAYS  # item kinds
from eventwire.store.client import (
    CLUSTER_NODE_CONNECTIONS,
    OUTAGE,
    REDIS_POOL_SIZE,
    RedisClient,
    RedisError,
    ResponseError,
    connect_redis,
    connect_stream_reader,
    redis_client,
)
from eventwire.store.cluster import CLUSTER_POLL_MS, CLUSTER_READS, ClusterCalls, on_key_node
from eventwire.store.functions import (
    FN_ALIAS,
    FN_HEARTBEAT,
    FN_LEAVE,
    FN_OPEN,
    FN_PUBLISH,
    FN_REAP,
    LAYOUTS,
    LIBRARY,
    LIBRARY_VERSION,
    AliasArgs,
    AliasKeys,
    CustomerKeys,
    HeartbeatArgs,
    HeartbeatKeys,
    LeaveArgs,
    LeaveKeys,
    OpenArgs,
    PublishArgs,
    PublishFrameArgs,
    PublishFrameKeys,
    PublishItem,
    PublishKeys,
    ReapArgs,
    ReapKeys,
    RecordHole,
    call_keys,
    fill_template,
    identify_record,
    identify_refused_record,
    session_end_record,
    session_start_record,
)
from eventwire.store.groups import ConsumerGroup, GroupMissing, StreamProgress
from eventwire.store.keys import Keys
from eventwire.store.publisher import Frame, FrameSink, Store
from eventwire.store.replies import (
    LAG_COUNTED,
    AliasReply,
    Claimed,
    ConsumerInfo,
    FrameResult,
    GroupInfo,
    LeaveReply,
    OpenReply,
    PendingSummary,
    PublishReply,
    ReapReply,
    SiteSnapshot,
    StreamEntry,
    StreamInfo,
    counted_lag,
    group_lag,
    merge_stream_info,
    parse_alias,
    parse_consumers,
    parse_groups,
    parse_leave,
    parse_open,
    parse_pending_range,
    parse_pending_summary,
    parse_publish,
    parse_reap,
    parse_stream_info,
    publish_counts,
    reply_field,
    reply_text,
    stream_entries,
    stream_id,
    time_ms,
    trimmed_after,
    xread_entries,
)
from eventwire.store.resp import (
    FrameIds,
    bulk_count,
    pack_args,
    pack_fcall,
    pack_frame_ids,
    pack_items,
)
from eventwire.store.streams import (
    StreamsReader,
    read_page,
    read_site_summary,
    redis_time_ms,
    stream_end,
)

__all__ = [
    "CLUSTER_NODE_CONNECTIONS",
    "CLUSTER_POLL_MS",
    "CLUSTER_READS",
    "COUNT_ONLY",
    "EVENT",
    "FN_ALIAS",
    "FN_HEARTBEAT",
    "FN_LEAVE",
    "FN_OPEN",
    "FN_PUBLISH",
    "FN_REAP",
    "LAG_COUNTED",
    "LAYOUTS",
    "LIBRARY",
    "LIBRARY_VERSION",
    "OUTAGE",
    "REDIS_POOL_SIZE",
    "REJECT",
    "REJECT_ALWAYS",
    "AliasArgs",
    "AliasKeys",
    "AliasReply",
    "Claimed",
    "ClusterCalls",
    "ConsumerGroup",
    "ConsumerInfo",
    "CustomerKeys",
    "Frame",
    "FrameIds",
    "FrameResult",
    "FrameSink",
    "GroupInfo",
    "GroupMissing",
    "HeartbeatArgs",
    "HeartbeatKeys",
    "Keys",
    "LeaveArgs",
    "LeaveKeys",
    "LeaveReply",
    "OpenArgs",
    "OpenReply",
    "PendingSummary",
    "PublishArgs",
    "PublishFrameArgs",
    "PublishFrameKeys",
    "PublishItem",
    "PublishKeys",
    "PublishReply",
    "ReapArgs",
    "ReapKeys",
    "ReapReply",
    "RecordHole",
    "RedisClient",
    "RedisError",
    "ResponseError",
    "SiteSnapshot",
    "Store",
    "StreamEntry",
    "StreamInfo",
    "StreamProgress",
    "StreamsReader",
    "bulk_count",
    "call_keys",
    "connect_redis",
    "connect_stream_reader",
    "counted_lag",
    "fill_template",
    "group_lag",
    "identify_record",
    "identify_refused_record",
    "merge_stream_info",
    "on_key_node",
    "pack_args",
    "pack_fcall",
    "pack_frame_ids",
    "pack_items",
    "parse_alias",
    "parse_consumers",
    "parse_groups",
    "parse_leave",
    "parse_open",
    "parse_pending_range",
    "parse_pending_summary",
    "parse_publish",
    "parse_reap",
    "parse_stream_info",
    "publish_counts",
    "read_page",
    "read_site_summary",
    "redis_client",
    "redis_time_ms",
    "reply_field",
    "reply_text",
    "session_end_record",
    "session_start_record",
    "stream_end",
    "stream_entries",
    "stream_id",
    "time_ms",
    "trimmed_after",
    "xread_entries",
]
