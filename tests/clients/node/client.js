#!/usr/bin/env node
// A storyreel client in Node, with nothing but the public contract (gateway.proto and
// the shared types.proto beside it): it creates a job,
// watches it to the end, downloads the video with ReadArtifact and checks that it
// is an MP4 with an H.264 video track and an AAC audio track.
//
//   npm ci
//   node client.js --address 127.0.0.1:50050 --key KEY --out video.mp4 [--prompt TEXT]
//
// --proto names gateway.proto (default: the repository's). The key may also come
// from STORYREEL_API_KEY. Prints one JSON line describing what it saw; exits 1
// with a message on stderr on any failure.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

function parseArgs(argv) {
  const args = {
    address: process.env.STORYREEL_GATEWAY || "127.0.0.1:50050",
    key: process.env.STORYREEL_API_KEY || "",
    proto: path.resolve(__dirname, "../../../protos/storyreel/gateway/v1/gateway.proto"),
    out: "video.mp4",
    prompt: "A lighthouse keeper befriends a lost whale",
    scenes: 2,
    timeout: 300,
  };
  for (let i = 2; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, "");
    if (!(name in args) || i + 1 >= argv.length) throw new Error(`unknown or incomplete option ${argv[i]}`);
    args[name] = typeof args[name] === "number" ? Number(argv[i + 1]) : argv[i + 1];
  }
  return args;
}

// The service from gateway.proto: it imports storyreel/types/v1/types.proto (found under
// the same root) and google/protobuf/timestamp.proto, which proto-loader (protobufjs)
// knows without a file.
function loadService(protoFile) {
  const root = path.resolve(path.dirname(protoFile), "../../..");
  const definition = protoLoader.loadSync(path.relative(root, protoFile), {
    includeDirs: [root],
    keepCase: true,
    longs: String, // uint64 and int64 as decimal strings: no precision lost
    enums: String, // enum values by name, e.g. "JOB_STATE_DONE"
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition);
  return pkg.storyreel.gateway.v1.StoryReelService;
}

function unary(client, method, request, metadata, deadlineS = 60) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + deadlineS * 1000);
    client[method](request, metadata, { deadline }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

// A server stream's messages go to onData; resolves once the stream has ended with an OK
// status (grpc-js reports the end and the status in either order), rejects on any other.
function serverStream(call, onData) {
  return new Promise((resolve, reject) => {
    let ended = false;
    let ok = false;
    let failed = null;
    call.on("data", onData);
    call.on("error", (error) => {
      failed = error;
    });
    call.on("status", (status) => {
      if (status.code !== grpc.status.OK) {
        reject(failed || Object.assign(new Error(status.details), status));
        return;
      }
      ok = true;
      if (ended) resolve();
    });
    call.on("end", () => {
      ended = true;
      if (ok) resolve();
    });
  });
}

// Every WatchJob event until the stream ends (after JOB_FINISHED).
async function watch(client, jobId, metadata, deadlineS) {
  const events = [];
  const deadline = new Date(Date.now() + deadlineS * 1000);
  const call = client.WatchJob({ job_id: jobId }, metadata, { deadline });
  await serverStream(call, (event) => events.push(event));
  return events;
}

// ReadArtifact: the first message says the size and type, the rest carry the bytes.
// Written to `out` as they arrive, so the whole file is never in memory.
async function readArtifact(client, request, metadata, out) {
  const call = client.ReadArtifact(request, metadata);
  const file = out ? fs.createWriteStream(out) : null;
  const hash = crypto.createHash("sha256");
  let head = null;
  let received = 0;
  let chunks = 0;
  let largest = 0;
  try {
    await serverStream(call, (message) => {
      if (head === null) {
        head = message;
        return;
      }
      const chunk = message.chunk;
      received += chunk.length;
      chunks += 1;
      largest = Math.max(largest, chunk.length);
      hash.update(chunk);
      if (file && !file.write(chunk)) {
        call.pause(); // back-pressure: wait for the file to catch up
        file.once("drain", () => call.resume());
      }
    });
  } catch (error) {
    if (file) file.destroy();
    throw error;
  }
  if (file) await new Promise((resolve, reject) => file.end((error) => (error ? reject(error) : resolve())));
  return {
    size: Number(head.size_bytes),
    content_type: head.content_type,
    received,
    chunks,
    largest,
    sha256: hash.digest("hex"),
  };
}

// -- MP4 ------------------------------------------------------------------------------------
// Just enough ISO BMFF to list the tracks: the boxes moov/trak/mdia/minf/stbl, the
// handler (hdlr), the sample entry (stsd) and the media header (mdhd).

function* boxes(buf, start, end) {
  let at = start;
  while (at + 8 <= end) {
    let size = buf.readUInt32BE(at);
    const type = buf.toString("latin1", at + 4, at + 8);
    let header = 8;
    if (size === 1) {
      size = Number(buf.readBigUInt64BE(at + 8));
      header = 16;
    } else if (size === 0) {
      size = end - at;
    }
    if (size < header || at + size > end) throw new Error(`bad MP4 box ${type} at ${at}`);
    yield { type, start: at + header, end: at + size };
    at += size;
  }
}

function child(buf, box, type) {
  for (const b of boxes(buf, box.start, box.end)) if (b.type === type) return b;
  return null;
}

function describeMp4(buf) {
  const top = [...boxes(buf, 0, buf.length)];
  if (!top.length || top[0].type !== "ftyp") throw new Error("not an MP4: no ftyp box first");
  const ftyp = top[0];
  const majorBrand = buf.toString("latin1", ftyp.start, ftyp.start + 4);
  const brands = [majorBrand];
  for (let at = ftyp.start + 8; at + 4 <= ftyp.end; at += 4) brands.push(buf.toString("latin1", at, at + 4));
  const moov = top.find((b) => b.type === "moov");
  if (!moov) throw new Error("no moov box");
  const tracks = [];
  for (const trak of boxes(buf, moov.start, moov.end)) {
    if (trak.type !== "trak") continue;
    const mdia = child(buf, trak, "mdia");
    const hdlr = child(buf, mdia, "hdlr");
    const mdhd = child(buf, mdia, "mdhd");
    const stbl = child(buf, child(buf, mdia, "minf"), "stbl");
    const stsd = child(buf, stbl, "stsd");
    // FullBox: version(1) flags(3); mdhd v0: times 4+4, timescale 4, duration 4 (v1: 8-byte times).
    const version = buf.readUInt8(mdhd.start);
    const timescale = buf.readUInt32BE(mdhd.start + (version === 1 ? 20 : 12));
    const duration =
      version === 1 ? Number(buf.readBigUInt64BE(mdhd.start + 24)) : buf.readUInt32BE(mdhd.start + 16);
    const entry = [...boxes(buf, stsd.start + 8, stsd.end)][0];
    const track = {
      handler: buf.toString("latin1", hdlr.start + 8, hdlr.start + 12),
      codec: entry.type,
      duration_s: duration / timescale,
    };
    if (track.handler === "vide") {
      track.width = buf.readUInt16BE(entry.start + 24);
      track.height = buf.readUInt16BE(entry.start + 26);
    } else if (track.handler === "soun") {
      track.channels = buf.readUInt16BE(entry.start + 16);
      track.sample_rate = buf.readUInt32BE(entry.start + 24) >>> 16;
    }
    tracks.push(track);
  }
  return { brands, tracks };
}

// -- the client -------------------------------------------------------------------------------

async function main() {
  const args = parseArgs(process.argv);
  const Service = loadService(args.proto);
  const client = new Service(args.address, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (args.key) metadata.set("authorization", `Bearer ${args.key}`);

  const created = await unary(
    client,
    "CreateVideo",
    { prompt: args.prompt, scene_count: args.scenes, captions: "CAPTIONS_SIDECAR" },
    metadata,
  );
  const jobId = created.job_id;
  const events = await watch(client, jobId, metadata, args.timeout);
  const kinds = events.map((e) => e.kind);
  const job = events[events.length - 1].job;
  if (kinds[0] !== "EVENT_KIND_SNAPSHOT" || kinds[kinds.length - 1] !== "EVENT_KIND_JOB_FINISHED") {
    throw new Error(`unexpected WatchJob stream: ${kinds.join(", ")}`);
  }
  if (job.state !== "JOB_STATE_DONE") {
    throw new Error(`job ${jobId} ended ${job.state}: ${job.error && job.error.code} ${job.error && job.error.message}`);
  }
  // Watching a finished job: its snapshot, then the end.
  const again = (await watch(client, jobId, metadata, 30)).map((e) => e.kind);

  const video = await readArtifact(client, { job_id: jobId, uri: job.video_uri }, metadata, args.out);
  if (video.received !== video.size) throw new Error(`got ${video.received} of ${video.size} bytes`);
  const mp4 = describeMp4(fs.readFileSync(args.out));
  const handlers = mp4.tracks.map((t) => t.handler).sort();
  if (handlers.join(",") !== "soun,vide") throw new Error(`tracks: ${JSON.stringify(mp4.tracks)}`);
  const captions = await readArtifact(client, { job_id: jobId, uri: job.captions_vtt.uri }, metadata, null);

  // A URI that is not the job's is NOT_FOUND, whatever it names.
  let foreign = "OK";
  try {
    await readArtifact(client, { job_id: jobId, uri: job.video_uri.replace(jobId, "another-job") }, metadata, null);
  } catch (error) {
    foreign = grpc.status[error.code];
  }

  console.log(
    JSON.stringify({
      job_id: jobId,
      state: job.state,
      video_uri: job.video_uri,
      captions_vtt_uri: job.captions_vtt.uri,
      seed: job.seed,
      title: job.storyboard.title,
      scenes: job.storyboard.scenes.length,
      aspect: job.aspect,
      events: kinds,
      watch_again: again,
      video: { ...video, ...mp4 },
      captions: { size: captions.size, content_type: captions.content_type, sha256: captions.sha256 },
      foreign_uri: foreign,
    }),
  );
  client.close();
}

main().catch((error) => {
  console.error(`storyreel node client: ${error.details || error.message || error}`);
  process.exit(1);
});
