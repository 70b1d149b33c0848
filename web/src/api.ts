// The gateway's public API as the studio calls it: the generated StoryReelService over
// gRPC-Web on the page's own origin, an API key in the `authorization` header, artifacts
// read with ReadArtifact into Blobs, and the gateway's errors as plain text.

import { create, fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import {
  StoryReelService,
  UploadAudioRequestSchema,
  UploadAudioResponseSchema,
  UploadImageRequestSchema,
  UploadImageResponseSchema,
  type UploadAudioResponse,
  type UploadImageResponse,
} from "./gen/storyreel/gateway/v1/gateway_pb";

const KEY_ITEM = "storyreel.studio.apiKey";

/** The API key of this browser tab's session ("" when none was entered). */
export function apiKey(): string {
  return sessionStorage.getItem(KEY_ITEM) ?? "";
}

export function setApiKey(key: string): void {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

function authHeaders(headers: Headers): void {
  const key = apiKey();
  if (key) headers.set("authorization", `Bearer ${key}`);
}

const auth: Interceptor = (next) => async (req) => {
  authHeaders(req.header);
  return next(req);
};

const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  useBinaryFormat: true,
  interceptors: [auth],
});

export const api = createClient(StoryReelService, transport);

/** gRPC's names of the status codes, by number (what the gateway and its docs say). */
const CODE_NAMES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
  "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
  "UNAUTHENTICATED",
];

export function codeName(code: Code): string {
  return CODE_NAMES[code] ?? `code ${code}`;
}

/** What a failed call says to a person: the gateway's status code and message, never a stack. */
export function describeError(error: unknown): string {
  if (error instanceof ConnectError) {
    const message = error.rawMessage || "(no message)";
    return `${codeName(error.code)}: ${message}`;
  }
  if (error instanceof Error) return error.message;
  return String(error);
}

export function isCode(error: unknown, ...codes: Code[]): boolean {
  return error instanceof ConnectError && codes.includes(error.code);
}

export { Code, ConnectError };

/** The bytes of one of the job's artifacts (ReadArtifact), as a Blob of its media type. */
export async function readArtifact(
  jobId: string,
  uri: string,
  signal?: AbortSignal,
): Promise<Blob> {
  const parts: Uint8Array[] = [];
  let type = "application/octet-stream";
  for await (const message of api.readArtifact({ jobId, uri }, { signal })) {
    if (message.contentType) type = message.contentType;
    if (message.chunk.length) parts.push(message.chunk);
  }
  return new Blob(parts as BlobPart[], { type });
}

// --- uploads -----------------------------------------------------------------------------
//
// UploadAudio and UploadImage are client-streaming calls: a first message with the file
// name, then chunks. connect-web (like every browser gRPC-Web client) sends only unary and
// server-streaming calls, because fetch cannot stream a request body. The gRPC-Web wire
// format itself carries any number of messages in one request body, so the studio sends
// the whole stream at once: one POST whose body is every length-prefixed message in order.
// Whether the gateway accepts it is the gateway's answer, shown as any other error.

const CHUNK_BYTES = 256 * 1024;

function frame(payload: Uint8Array, flags = 0): Uint8Array {
  const out = new Uint8Array(5 + payload.length);
  out[0] = flags;
  new DataView(out.buffer).setUint32(1, payload.length);
  out.set(payload, 5);
  return out;
}

function statusFrom(fields: Map<string, string>, fallback: string): ConnectError | null {
  const status = fields.get("grpc-status");
  if (status === undefined) return null;
  const code = Number(status);
  if (code === 0) return null;
  const message = decodeURIComponent(fields.get("grpc-message") ?? fallback);
  return new ConnectError(message, code as Code);
}

function parseTrailer(bytes: Uint8Array): Map<string, string> {
  const fields = new Map<string, string>();
  for (const line of new TextDecoder().decode(bytes).split("\r\n")) {
    const colon = line.indexOf(":");
    if (colon > 0) fields.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
  }
  return fields;
}

async function clientStream<I extends DescMessage, O extends DescMessage>(
  method: string,
  input: I,
  output: O,
  messages: MessageShape<I>[],
): Promise<MessageShape<O>> {
  const frames = messages.map((message) => frame(toBinary(input, message)));
  const headers = new Headers({
    "content-type": "application/grpc-web+proto",
    "x-grpc-web": "1",
    "x-user-agent": "storyreel-studio",
  });
  authHeaders(headers);
  const response = await fetch(`${location.origin}/${StoryReelService.typeName}/${method}`, {
    method: "POST",
    headers,
    body: new Blob(frames as BlobPart[]),
  });
  const headerFields = new Map<string, string>();
  response.headers.forEach((value, name) => headerFields.set(name.toLowerCase(), value));
  const early = statusFrom(headerFields, response.statusText);
  if (early) throw early;
  if (!response.ok) {
    throw new ConnectError(`HTTP ${response.status} ${response.statusText}`, Code.Unavailable);
  }
  const body = new Uint8Array(await response.arrayBuffer());
  let result: MessageShape<O> | null = null;
  let offset = 0;
  while (offset + 5 <= body.length) {
    const flags = body[offset];
    const length = new DataView(body.buffer, body.byteOffset + offset + 1, 4).getUint32(0);
    const payload = body.subarray(offset + 5, offset + 5 + length);
    offset += 5 + length;
    if (flags & 0x80) {
      const failed = statusFrom(parseTrailer(payload), "");
      if (failed) throw failed;
    } else {
      result = fromBinary(output, payload);
    }
  }
  if (!result) throw new ConnectError("the gateway answered no message", Code.Internal);
  return result;
}

async function chunked(file: Blob): Promise<Uint8Array[]> {
  const bytes = new Uint8Array(await file.arrayBuffer());
  const chunks: Uint8Array[] = [];
  for (let start = 0; start < bytes.length; start += CHUNK_BYTES) {
    chunks.push(bytes.subarray(start, start + CHUNK_BYTES));
  }
  return chunks;
}

/** UploadAudio of a file the user picked; its audio_uri is CreateVideoRequest.audio_uri. */
export async function uploadAudio(file: File): Promise<UploadAudioResponse> {
  const messages = [
    create(UploadAudioRequestSchema, { payload: { case: "filename", value: file.name } }),
    ...(await chunked(file)).map((chunk) =>
      create(UploadAudioRequestSchema, { payload: { case: "chunk", value: chunk } }),
    ),
  ];
  return clientStream("UploadAudio", UploadAudioRequestSchema, UploadAudioResponseSchema, messages);
}

/** UploadImage of a character's reference picture; its image_uri is Character.reference_uri. */
export async function uploadImage(file: File): Promise<UploadImageResponse> {
  const messages = [
    create(UploadImageRequestSchema, { payload: { case: "filename", value: file.name } }),
    ...(await chunked(file)).map((chunk) =>
      create(UploadImageRequestSchema, { payload: { case: "chunk", value: chunk } }),
    ),
  ];
  return clientStream("UploadImage", UploadImageRequestSchema, UploadImageResponseSchema, messages);
}
