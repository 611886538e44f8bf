"""``mnemoguard audit``: which saved checkpoint, of any trainer, is the last one that does not copy its training
images (docs/audit.md)."""

from .checkpoints import AuditError, Checkpoint, applied, find_checkpoints, lora_format, read_lora
from .data import ImageRecord, load_audit_data
from .run import Auditor, AuditResult, run_audit
from .settings import AuditSettings
from .verdict import recommended, replay, verdict_of

__all__ = ["AuditError", "AuditResult", "AuditSettings", "Auditor", "Checkpoint", "ImageRecord", "applied",
           "find_checkpoints", "load_audit_data", "lora_format", "read_lora", "recommended", "replay", "run_audit",
           "verdict_of"]
