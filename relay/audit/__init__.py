"""The tamper-evident audit log's pure core: records, the hash chain, checkpoints.

Nothing in this package imports trio, sockets, TLS, clocks or files: bytes and
times come in as arguments, and the shell writes and reads the log.
"""

from relay.audit import chain, verify
from relay.audit.chain import (
    CHECKPOINT_DOMAIN as CHECKPOINT_DOMAIN,
    CHECKPOINT_EVENT as CHECKPOINT_EVENT,
    GENESIS_HASH as GENESIS_HASH,
    MAX_FIELDS as MAX_FIELDS,
    MAX_LINE_BYTES as MAX_LINE_BYTES,
    MAX_LIST_ITEMS as MAX_LIST_ITEMS,
    MAX_STRING_CHARS as MAX_STRING_CHARS,
    AuditChain as AuditChain,
    FieldValue as FieldValue,
    Record as Record,
    Signer as Signer,
    checkpoint_due as checkpoint_due,
    checkpoint_message as checkpoint_message,
    parse_record as parse_record,
    record_hash as record_hash,
)
from relay.audit.verify import (
    PROBLEM_REASONS as PROBLEM_REASONS,
    Problem as Problem,
    ProblemReason as ProblemReason,
    VerifyReport as VerifyReport,
    verify_lines as verify_lines,
)

__all__ = [*chain.__all__, *verify.__all__]
