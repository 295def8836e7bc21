// keyhole-client: a Node.js client for keyholed, written from proto-spec.md alone.
export * from "./errors.js";
export { DecodeError, Reader, Writer } from "./codec.js";
export * from "./protocol.js";
export * from "./hub.js";
export { discover, runtimeDir, parseDaemonUid, parseTokenText, readTokenFile, loadToken } from "./discovery.js";
export type { Discovered, DiscoverOptions, Env, TokenSource } from "./discovery.js";
export { peerSnapshot, samePeer } from "./peer.js";
export type { PeerSnapshot } from "./peer.js";
export { Connection } from "./connection.js";
export type { ConnectOptions, RequestSpec, ServiceHooks } from "./connection.js";
export { HubClient, IncomingRequest, Subscription } from "./client.js";
export type { HubConnectOptions, Payload, RequestOptions, SubscriptionItem } from "./client.js";
