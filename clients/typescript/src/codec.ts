// The encoding of section 5 of proto-spec.md: fixed-width little-endian
// integers, u64-length-prefixed strings and byte strings, u32 enum tags, no
// padding. The decoder is strict: every length is checked against the bytes
// left before anything is allocated, and a message must use its bytes exactly.

/** A message that does not decode (section 5). */
export class DecodeError extends Error {
  override name = "DecodeError";
}

const U64_MAX = (1n << 64n) - 1n;
const U32_MAX = 0xffff_ffff;

// fatal: invalid UTF-8 (surrogates, overlong forms, > U+10FFFF) throws;
// ignoreBOM: a leading EF BB BF is part of the text (section 5), not stripped.
const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** Converts a number or bigint to a u64, refusing anything else. */
export function toU64(value: bigint | number, what: string): bigint {
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw new RangeError(`${what} must be an integer from 0 to 2^53-1 as a number, or a bigint: ${value}`);
    }
    return BigInt(value);
  }
  if (value < 0n || value > U64_MAX) {
    throw new RangeError(`${what} must be from 0 to 2^64-1: ${value}`);
  }
  return value;
}

function checkU32(value: number, what: string): number {
  if (!Number.isInteger(value) || value < 0 || value > U32_MAX) {
    throw new RangeError(`${what} must be an integer from 0 to 4294967295: ${value}`);
  }
  return value;
}

/** Builds a payload from the types of section 5. */
export class Writer {
  private chunks: Buffer[] = [];
  private size = 0;

  private push(b: Buffer): this {
    this.chunks.push(b);
    this.size += b.length;
    return this;
  }

  u8(v: number): this {
    const b = Buffer.alloc(1);
    b.writeUInt8(v);
    return this.push(b);
  }

  bool(v: boolean): this {
    return this.u8(v ? 1 : 0);
  }

  u32(v: number, what = "u32"): this {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(checkU32(v, what));
    return this.push(b);
  }

  u64(v: bigint | number, what = "u64"): this {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(toU64(v, what));
    return this.push(b);
  }

  optionU64(v: bigint | number | null): this {
    if (v === null) return this.u8(0);
    return this.u8(1).u64(v);
  }

  /** A String: u64 byte length, then its UTF-8 bytes. */
  string(v: string): this {
    const bytes = Buffer.from(v, "utf8");
    if (bytes.toString("utf8") !== v) {
      // A lone surrogate would be encoded as U+FFFD: refuse rather than change the text.
      throw new RangeError("a String must be valid Unicode (no lone surrogates)");
    }
    return this.u64(bytes.length).push(bytes);
  }

  /** bytes: u64 length, then the raw bytes (copied). */
  bytes(v: Uint8Array): this {
    return this.u64(v.length).push(Buffer.from(v));
  }

  raw(v: Uint8Array): this {
    return this.push(Buffer.from(v));
  }

  get length(): number {
    return this.size;
  }

  finish(): Buffer {
    return Buffer.concat(this.chunks, this.size);
  }
}

/** Reads a payload strictly (section 5). Every method throws DecodeError. */
export class Reader {
  private pos = 0;

  constructor(private readonly buf: Buffer) {}

  get remaining(): number {
    return this.buf.length - this.pos;
  }

  private need(n: number, what: string): void {
    if (n > this.remaining) {
      throw new DecodeError(`${what} runs past the end of the payload (${n} bytes needed, ${this.remaining} left)`);
    }
  }

  u8(what = "u8"): number {
    this.need(1, what);
    return this.buf.readUInt8(this.pos++);
  }

  bool(what = "bool"): boolean {
    const b = this.u8(what);
    if (b === 0) return false;
    if (b === 1) return true;
    throw new DecodeError(`${what}: a bool must be 00 or 01, not ${b.toString(16).padStart(2, "0")}`);
  }

  u32(what = "u32"): number {
    this.need(4, what);
    const v = this.buf.readUInt32LE(this.pos);
    this.pos += 4;
    return v;
  }

  u64(what = "u64"): bigint {
    this.need(8, what);
    const v = this.buf.readBigUInt64LE(this.pos);
    this.pos += 8;
    return v;
  }

  optionU64(what = "Option<u64>"): bigint | null {
    const p = this.u8(`${what} presence byte`);
    if (p === 0) return null;
    if (p === 1) return this.u64(what);
    throw new DecodeError(`${what}: presence byte must be 00 or 01, not ${p.toString(16).padStart(2, "0")}`);
  }

  /** A length checked against the bytes left, before anything is allocated. */
  private length(what: string): number {
    const n = this.u64(`${what} length`);
    if (n > BigInt(this.remaining)) {
      throw new DecodeError(`${what} announces ${n} bytes but only ${this.remaining} are left`);
    }
    return Number(n);
  }

  string(what = "String"): string {
    const n = this.length(what);
    const slice = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    try {
      return utf8.decode(slice);
    } catch {
      throw new DecodeError(`${what} is not valid UTF-8`);
    }
  }

  /** bytes: a copy, so that the caller may keep it without keeping the frame. */
  bytes(what = "bytes"): Buffer {
    const n = this.length(what);
    const out = Buffer.from(this.buf.subarray(this.pos, this.pos + n));
    this.pos += n;
    return out;
  }

  /** A Vec count: each element takes at least `minElement` bytes, so a larger count is refused at once. */
  count(what: string, minElement: number): number {
    const n = this.u64(`${what} count`);
    if (n * BigInt(minElement) > BigInt(this.remaining)) {
      throw new DecodeError(`${what} announces ${n} entries but only ${this.remaining} bytes are left`);
    }
    return Number(n);
  }

  /** The rest of the payload (a service message inside a transport frame). */
  rest(): Buffer {
    const out = this.buf.subarray(this.pos);
    this.pos = this.buf.length;
    return out;
  }

  end(what = "message"): void {
    if (this.remaining !== 0) {
      throw new DecodeError(`${this.remaining} bytes left over after the ${what}`);
    }
  }
}
