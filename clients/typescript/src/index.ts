/**
 * `@nucleus-actors/client`: a typed, read-only client of the nucleus_actors ledger daemon and
 * client-side verification of its hash chain, proofs and checkpoints (docs/typescript.md).
 */
export {
  NucleusApiError,
  NucleusClient,
  type ClientOptions,
  type ConsistencyProof,
  type Entry,
  type Features,
  type Head,
  type InclusionProof,
  type LedgerSummary,
  type LifecycleEvent,
  type ModuleStatus,
  type Page,
  type Problem,
  type Statistics,
  type TailOptions,
  type VerifyResult,
} from "./client.js";
export { parseEventStream, type ServerSentEvent } from "./sse.js";
export {
  BLAKE3,
  canonicalBytes,
  canonicalJson,
  chainHash,
  ChainVerifier,
  fromHex,
  genesis,
  leafHash,
  merkleRoot,
  nodeHash,
  ProofError,
  parseVerifierKey,
  recordOf,
  SHA256,
  toHex,
  verifyCheckpoint,
  verifyConsistency,
  verifyEntries,
  verifyInclusion,
  type ChainBreak,
  type ChainOk,
  type Checkpoint,
  type CommittedRecord,
  type EntryLike,
  type Hasher,
} from "./verify.js";
export type { components, paths } from "./generated/openapi.js";
