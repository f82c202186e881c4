// TypeScript declarations for chatcore.js, the browser client of chatcore's
// protocol v1. See docs/client-js.md.

/** Where a room's order stands for this client. */
export interface Position {
  epoch: string;
  offset: number;
}

export type Status = "idle" | "connecting" | "open" | "reconnecting" | "closed" | "failed";

export interface ChatClientOptions {
  /** The first reconnect waits up to this long (full jitter); default 500. */
  minDelayMs?: number;
  /** Reconnect delays never exceed this; default 30000. */
  maxDelayMs?: number;
  /** A request without a reply within this long is rejected; default 10000. */
  requestTimeoutMs?: number;
  /** Attempts in a row that end before `hello`, before giving up (status "failed"); default 3. */
  maxSignInAttempts?: number;
}

export interface Hello {
  type: "hello";
  user: string;
  protocol?: number;
  heartbeat?: { interval_ms: number; timeout_ms: number };
  [field: string]: unknown;
}

export interface JoinReply {
  room: string;
  epoch: string;
  offset: number;
  /** Present when the join asked to recover (`since`): whether every missed message follows. */
  recovered?: boolean;
}

export interface Joined extends JoinReply {
  /** True when the page should reload the room (first join, not recovered, new epoch). */
  reset: boolean;
}

export interface RoomMessage {
  type: "message";
  room: string;
  epoch: string;
  offset: number;
  from: string;
  data: unknown;
  [field: string]: unknown;
}

export interface Reset {
  room: string;
  epoch: string;
  offset: number;
  reason: "epoch" | "gap";
}

export interface Shutdown {
  type: "shutdown";
  reconnect_after_ms: number;
  [field: string]: unknown;
}

export interface Close {
  code: number;
  reason: string;
}

export interface Failed extends Close {
  attempts: number;
}

export interface PresenceState {
  type: "presence_state";
  room: string;
  users: Record<string, unknown[]>;
}

export interface PresenceDiff {
  type: "presence_diff";
  room: string;
  joins: Record<string, unknown[]>;
  leaves: Record<string, unknown[]>;
}

export interface ErrorEvent {
  code: string;
  message: string;
  [field: string]: unknown;
}

/** A rejected request: `code` is the reply's error code (e.g. "not_joined"). */
export interface RequestError extends Error {
  code?: string;
}

export interface ChatClientEventMap {
  status: CustomEvent<Status>;
  hello: CustomEvent<Hello>;
  joined: CustomEvent<Joined>;
  message: CustomEvent<RoomMessage>;
  reset: CustomEvent<Reset>;
  shutdown: CustomEvent<Shutdown>;
  close: CustomEvent<Close>;
  failed: CustomEvent<Failed>;
  presence_state: CustomEvent<PresenceState>;
  presence_diff: CustomEvent<PresenceDiff>;
  error: CustomEvent<ErrorEvent>;
}

export declare class ChatClient extends EventTarget {
  constructor(url: string, options?: ChatClientOptions);
  readonly url: string;
  minDelayMs: number;
  maxDelayMs: number;
  requestTimeoutMs: number;
  maxSignInAttempts: number;
  readonly status: Status;
  /** The user name from the last `hello`. */
  readonly user: string | null;
  /** The position kept per joined room (rejoined with `since` after a reconnect). */
  readonly rooms: Map<string, Position>;

  connect(): void;
  close(): void;
  join(room: string): Promise<JoinReply>;
  leave(room: string): Promise<unknown>;
  /** Resolves with the message's offset once the server acknowledged it. */
  publish(room: string, data: unknown): Promise<number>;
  /** Sends without waiting for a reply; false when not connected. */
  send(message: Record<string, unknown>): boolean;
  request<T = unknown>(
    type: string,
    fields?: Record<string, unknown>,
    onReply?: ((data: T) => void) | null,
  ): Promise<T>;

  addEventListener<K extends keyof ChatClientEventMap>(
    type: K,
    listener: (event: ChatClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: (event: CustomEvent<any>) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof ChatClientEventMap>(
    type: K,
    listener: (event: ChatClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: (event: CustomEvent<any>) => void,
    options?: boolean | EventListenerOptions,
  ): void;
}
