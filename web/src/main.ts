// The studio page: write a prompt, watch the job, direct its storyboard, play and download
// the result, list and cancel jobs. Every call goes to the gateway's public API (api.ts).

import { clone, create } from "@bufbuild/protobuf";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";

import {
  api,
  apiKey,
  Code,
  describeError,
  isCode,
  readArtifact,
  setApiKey,
  uploadAudio,
  uploadImage,
} from "./api";
import {
  ArtifactKind,
  EventKind,
  JobState,
  Stage,
  type ArtifactVersion,
  type Job,
  type ListJobsResponse,
  type WatchJobResponse,
} from "./gen/storyreel/gateway/v1/gateway_pb";
import {
  Captions,
  CharacterSchema,
  StoryboardSchema,
  type Storyboard,
} from "./gen/storyreel/types/v1/types_pb";

// --- small helpers -----------------------------------------------------------------------

function $<T extends HTMLElement = HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`the page has no #${id}`);
  return found as T;
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Partial<Record<string, string>> = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

const STATE_NAMES: Record<JobState, string> = {
  [JobState.UNSPECIFIED]: "unknown",
  [JobState.QUEUED]: "queued",
  [JobState.RUNNING]: "running",
  [JobState.DONE]: "done",
  [JobState.FAILED]: "failed",
  [JobState.CANCELLED]: "cancelled",
  [JobState.REVIEW]: "review",
};
const STAGE_NAMES: Record<Stage, string> = {
  [Stage.UNSPECIFIED]: "—",
  [Stage.STORYBOARD]: "storyboard",
  [Stage.RENDER]: "render",
  [Stage.COMPOSE]: "compose",
};

const finished = (state: JobState) =>
  state === JobState.DONE || state === JobState.FAILED || state === JobState.CANCELLED;
const cancellable = (state: JobState) =>
  state === JobState.QUEUED || state === JobState.RUNNING || state === JobState.REVIEW;
const editable = (state: JobState) =>
  state === JobState.REVIEW || state === JobState.DONE || state === JobState.FAILED;

function when(ts: Timestamp | undefined): string {
  return ts ? timestampDate(ts).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" }) : "";
}

function shortened(text: string, most = 60): string {
  return text.length > most ? `${text.slice(0, most - 1)}…` : text;
}

function newKey(): string {
  if (typeof crypto !== "undefined" && "randomUUID" in crypto) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function randomSeed(): bigint {
  const words = new Uint32Array(2);
  crypto.getRandomValues(words);
  return ((BigInt(words[0] & 0x7fffffff) << 32n) | BigInt(words[1])) || 1n;
}

function slug(job: Job): string {
  const base = (job.storyboard?.title || job.prompt || job.jobId).toLowerCase();
  return base.replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 48) || job.jobId;
}

// --- errors and access -------------------------------------------------------------------

function showError(error: unknown): void {
  if (isCode(error, Code.Unauthenticated)) {
    askForKey(describeError(error));
    return;
  }
  $("error-text").textContent = describeError(error);
  $("error").hidden = false;
}

function clearError(): void {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function askForKey(message: string): void {
  $("access").hidden = false;
  $("access-message").textContent = message;
  $("connection").textContent = "The gateway asks for an API key.";
  const input = $<HTMLInputElement>("api-key");
  input.value = apiKey();
  input.focus();
}

/** One cheap call (the first page of jobs): whether the gateway takes our calls. */
async function connect(): Promise<boolean> {
  try {
    const page = await api.listJobs({ pageSize: 20 });
    $("access").hidden = true;
    $("access-message").textContent = "";
    $("connection").textContent = apiKey()
      ? "Connected, with the API key kept for this tab."
      : "Connected.";
    $("change-key").hidden = !apiKey();
    renderJobs(page, false);
    return true;
  } catch (error) {
    if (isCode(error, Code.Unauthenticated)) {
      askForKey(describeError(error));
    } else {
      $("connection").textContent = "The gateway cannot be reached.";
      showError(error);
    }
    return false;
  }
}

// --- the current job ---------------------------------------------------------------------

interface Current {
  jobId: string;
  job: Job | null;
  watch: AbortController;
  /** object URLs of the job's artifacts, by URI */
  blobs: Map<string, Promise<string>>;
  /** `${storyboard_version}` the editor was built from */
  boardVersion: number;
  boardDirty: boolean;
  videoUri: string;
}

let current: Current | null = null;
const JOB_ITEM = "storyreel.studio.job";

function artifactUrl(uri: string): Promise<string> {
  const job = current;
  if (!job) return Promise.reject(new Error("no job is open"));
  let url = job.blobs.get(uri);
  if (!url) {
    url = readArtifact(job.jobId, uri).then((blob) => URL.createObjectURL(blob));
    job.blobs.set(uri, url);
    url.catch(() => job.blobs.delete(uri));
  }
  return url;
}

function closeJob(): void {
  if (!current) return;
  current.watch.abort();
  for (const url of current.blobs.values()) url.then(URL.revokeObjectURL, () => undefined);
  current = null;
  for (const id of ["watch", "direct", "result"]) $(id).hidden = true;
  $("scenes-list").replaceChildren();
  $("versions").replaceChildren();
  const video = $<HTMLVideoElement>("video");
  video.removeAttribute("src");
  video.removeAttribute("data-uri");
  video.load();
  sessionStorage.removeItem(JOB_ITEM);
  history.replaceState(null, "", location.pathname + location.search);
}

function openJob(jobId: string, focus = false): void {
  if (current?.jobId !== jobId) {
    closeJob();
    current = {
      jobId,
      job: null,
      watch: new AbortController(),
      blobs: new Map(),
      boardVersion: -1,
      boardDirty: false,
      videoUri: "",
    };
  }
  history.replaceState(null, "", `#job=${encodeURIComponent(jobId)}`);
  sessionStorage.setItem(JOB_ITEM, jobId);
  $("watch").hidden = false;
  $("job-id").textContent = jobId;
  if (focus) $("watch-heading").focus();
  follow();
}

/** (Re)start watching the current job: WatchJob, reconnecting until it ends or waits for a
 * review. After an edit or a redraw of a finished job, ``minGeneration`` is the new run's:
 * a stream that shows the previous run's end is watched again until the new run shows. */
function follow(minGeneration = 0): void {
  const job = current;
  if (!job) return;
  job.watch.abort();
  const watch = new AbortController();
  job.watch = watch;
  void (async () => {
    let failures = 0;
    let early = 0;
    while (!watch.signal.aborted) {
      let last: Job | undefined;
      try {
        for await (const event of api.watchJob({ jobId: job.jobId }, { signal: watch.signal })) {
          failures = 0;
          if (event.job) last = event.job;
          if (current === job && !watch.signal.aborted) render(event.job, event);
        }
      } catch (error) {
        if (watch.signal.aborted) return;
        if (isCode(error, Code.NotFound, Code.Unauthenticated, Code.PermissionDenied,
          Code.InvalidArgument)) {
          showError(error);
          return;
        }
        failures += 1;
        status(`Connection lost (${describeError(error)}); reconnecting…`);
        await sleep(Math.min(500 * 2 ** failures, 10_000));
        continue;
      }
      if (last?.state === JobState.REVIEW) return;
      if (last && finished(last.state)) {
        if (last.generation >= minGeneration || early >= 20) return;
        early += 1;
      }
      await sleep(500);
    }
  })();
}

function status(text: string): void {
  $("watch-status").textContent = text;
}

function eventText(event: WatchJobResponse): string {
  switch (event.kind) {
    case EventKind.STAGE_STARTED:
      return `Stage ${STAGE_NAMES[event.stage]} started.`;
    case EventKind.STAGE_FINISHED:
      // The compose stage tells what to know of the video (Job.warnings) as its message.
      return `Stage ${STAGE_NAMES[event.stage]} finished.${event.message ? ` ${event.message}` : ""}`;
    case EventKind.SCENE_RENDERED:
      return `Scene ${event.sceneIndex} drawn.`;
    case EventKind.RETRYING:
      return `Retrying: ${event.message}`;
    case EventKind.REVIEW:
      return "The storyboard is written: review it below, then approve.";
    case EventKind.JOB_FINISHED:
      return `The job is ${STATE_NAMES[event.job?.state ?? JobState.UNSPECIFIED]}.`;
    default:
      return "";
  }
}

function render(job: Job | undefined, event?: WatchJobResponse): void {
  if (!job || !current || job.jobId !== current.jobId) return;
  current.job = job;
  const watch = $("watch");
  watch.hidden = false;
  watch.dataset.state = STATE_NAMES[job.state];
  watch.dataset.generation = String(job.generation);
  $("job-title").textContent = job.storyboard?.title || job.prompt;
  $("job-state").textContent = STATE_NAMES[job.state];
  $("job-stage").textContent = STAGE_NAMES[job.stage];
  $("job-eta").textContent =
    job.etaS > 0 && (job.state === JobState.QUEUED || job.state === JobState.RUNNING)
      ? `about ${Math.ceil(job.etaS)} s`
      : "—";
  $<HTMLProgressElement>("job-progress").value = job.progress;
  const failure = $("job-error");
  failure.hidden = job.state !== JobState.FAILED || !job.error;
  failure.textContent = job.error
    ? `Failed at the ${STAGE_NAMES[job.error.stage]} stage: ${job.error.code}: ${job.error.message}`
    : "";
  $<HTMLButtonElement>("cancel").disabled = !cancellable(job.state);
  if (event) {
    const text = eventText(event);
    if (text) status(text);
    else if (event.kind === EventKind.SNAPSHOT) status(`The job is ${STATE_NAMES[job.state]}.`);
  }
  renderScenes(job);
  renderDirect(job);
  renderResult(job);
  updateJobRow(job);
  if (event?.kind === EventKind.JOB_FINISHED || event?.kind === EventKind.REVIEW) {
    void refreshJobs();
  }
}

function renderScenes(job: Job): void {
  const list = $("scenes-list");
  const scenes = job.storyboard?.scenes ?? [];
  const count = Math.max(job.sceneCount, scenes.length, ...job.images.map((i) => i.index));
  while (list.children.length > count) list.lastElementChild?.remove();
  for (let index = 1; index <= count; index += 1) {
    let item = document.getElementById(`scene-${index}`);
    if (!item) {
      const img = el("img", { alt: `Scene ${index}` });
      img.hidden = true;
      item = el(
        "li",
        { id: `scene-${index}`, class: "scene" },
        el("figure", {},
          el("div", { class: "frame" }, img, el("span", { class: "pending", text: "Not drawn yet" })),
          el("figcaption", {}, el("strong", { text: `Scene ${index}` }), " ",
            el("span", { class: "narration" }))),
      );
      list.append(item);
    }
    const scene = scenes[index - 1];
    const narration = item.querySelector(".narration");
    if (narration) narration.textContent = scene?.narration ?? "";
    const image = job.images.find((i) => i.index === index);
    const img = item.querySelector("img");
    if (!img) continue;
    img.alt = scene ? `Scene ${index}: ${scene.imagePrompt}` : `Scene ${index}`;
    if (image && item.dataset.uri !== image.uri) {
      item.dataset.uri = image.uri;
      const uri = image.uri;
      const target = item;
      artifactUrl(uri).then(
        (url) => {
          if (target.dataset.uri !== uri || !current) return;
          img.src = url;
          img.hidden = false;
          // The job's state when the picture was shown (the tests read it).
          img.dataset.shownWhile = STATE_NAMES[current.job?.state ?? JobState.UNSPECIFIED];
          const pending = target.querySelector<HTMLElement>(".pending");
          if (pending) pending.hidden = true;
        },
        (error) => showError(error),
      );
    }
  }
}

// --- direct: the storyboard editor ---------------------------------------------------------

function renderDirect(job: Job): void {
  const section = $("direct");
  const board = job.storyboard;
  if (!current || !board || !board.scenes.length || !editable(job.state)) {
    section.hidden = true;
    return;
  }
  section.hidden = false;
  const review = job.state === JobState.REVIEW;
  $("approve").hidden = !review;
  $("direct-help").textContent = review
    ? `Version ${job.storyboardVersion}. Nothing is drawn yet: edit the scenes, save, then approve.`
    : `Version ${job.storyboardVersion}. Saving a change starts a new run: only scenes whose ` +
      "picture changed are drawn again, and the video is composed again as a new version.";
  if (current.boardVersion === job.storyboardVersion && !section.dataset.stale) {
    for (const button of document.querySelectorAll<HTMLButtonElement>(".redraw")) {
      button.hidden = review;
    }
    return;
  }
  current.boardVersion = job.storyboardVersion;
  current.boardDirty = false;
  delete section.dataset.stale;
  buildEditor(board, review);
}

function characterRow(index: number, name: string, appearance: string, reference: string) {
  const id = `character-${index}`;
  const row = el("fieldset", { class: "character", id });
  row.dataset.reference = reference;
  const referenceNote = el("span", { class: "muted", id: `${id}-reference-note`,
    text: reference ? `Reference: ${reference}` : "No reference picture" });
  const file = el("input", { id: `${id}-reference`, type: "file", accept: "image/png,image/jpeg,image/webp" });
  file.addEventListener("change", async () => {
    const picked = (file as HTMLInputElement).files?.[0];
    if (!picked) return;
    referenceNote.textContent = "Uploading…";
    try {
      const uploaded = await uploadImage(picked);
      row.dataset.reference = uploaded.imageUri;
      referenceNote.textContent = `Reference: ${uploaded.imageUri} (${uploaded.width}×${uploaded.height} ${uploaded.format})`;
      markDirty();
    } catch (error) {
      referenceNote.textContent = row.dataset.reference
        ? `Reference: ${row.dataset.reference}` : "No reference picture";
      showError(error);
    }
  });
  const remove = el("button", { type: "button", text: `Remove character ${index}` });
  remove.addEventListener("click", () => { row.remove(); markDirty(); });
  row.append(
    el("legend", { text: `Character ${index}` }),
    el("label", { for: `${id}-name`, text: `Character ${index} name` }),
    el("input", { id: `${id}-name`, class: "character-name", type: "text", value: name, required: "" }),
    el("label", { for: `${id}-appearance`, text: `Character ${index} appearance` }),
    Object.assign(el("textarea", { id: `${id}-appearance`, class: "character-appearance", rows: "2", maxlength: "80" }),
      { value: appearance }),
    el("label", { for: `${id}-reference`, text: `Character ${index} reference picture (for the reference-images mode)` }),
    file,
    referenceNote,
    remove,
  );
  return row;
}

function buildEditor(board: Storyboard, review: boolean): void {
  $<HTMLInputElement>("board-title").value = board.title;
  const characters = $("characters-list");
  characters.replaceChildren(
    ...board.characters.map((c, i) => characterRow(i + 1, c.name, c.appearance, c.referenceUri)),
  );
  const add = el("button", { type: "button", id: "add-character", text: "Add a character" });
  add.addEventListener("click", () => {
    const count = characters.querySelectorAll(".character").length;
    add.before(characterRow(count + 1, "", "", ""));
    markDirty();
  });
  characters.append(add);

  const scenes = $("board-scenes-list");
  scenes.replaceChildren(
    ...board.scenes.map((scene, i) => {
      const n = i + 1;
      const id = `board-scene-${n}`;
      const redraw = el("button", { type: "button", class: "redraw", text: `Redraw scene ${n}` });
      redraw.hidden = review;
      redraw.addEventListener("click", () => void regenerate(n));
      return el(
        "fieldset",
        { class: "board-scene", id },
        el("legend", { text: `Scene ${n}` }),
        el("label", { for: `${id}-narration`, text: `Scene ${n} narration` }),
        Object.assign(el("textarea", { id: `${id}-narration`, class: "scene-narration", rows: "3", maxlength: "220" }),
          { value: scene.narration }),
        el("label", { for: `${id}-prompt`, text: `Scene ${n} image prompt` }),
        Object.assign(el("textarea", { id: `${id}-prompt`, class: "scene-prompt", rows: "3" }),
          { value: scene.imagePrompt }),
        el("label", { for: `${id}-characters`, text: `Scene ${n} characters (names, comma-separated)` }),
        el("input", { id: `${id}-characters`, class: "scene-characters", type: "text",
          value: scene.characters.join(", ") }),
        redraw,
      );
    }),
  );
}

function markDirty(): void {
  if (current) current.boardDirty = true;
}

/** The storyboard as the editor shows it, on top of the job's (fields it does not show kept). */
function editedBoard(job: Job): Storyboard {
  const board = clone(StoryboardSchema, job.storyboard ?? create(StoryboardSchema));
  board.title = $<HTMLInputElement>("board-title").value.trim();
  board.characters = [...document.querySelectorAll<HTMLElement>("#characters-list .character")].map(
    (row) => {
      const name = row.querySelector<HTMLInputElement>(".character-name")?.value.trim() ?? "";
      const old = job.storyboard?.characters.find((c) => c.name === name);
      const character = old ? clone(CharacterSchema, old) : create(CharacterSchema, { name });
      character.appearance =
        row.querySelector<HTMLTextAreaElement>(".character-appearance")?.value.trim() ?? "";
      character.referenceUri = row.dataset.reference ?? "";
      return character;
    },
  );
  document.querySelectorAll<HTMLElement>(".board-scene").forEach((row, i) => {
    const scene = board.scenes[i];
    if (!scene) return;
    scene.narration = row.querySelector<HTMLTextAreaElement>(".scene-narration")?.value.trim() ?? "";
    scene.imagePrompt = row.querySelector<HTMLTextAreaElement>(".scene-prompt")?.value.trim() ?? "";
    scene.characters = (row.querySelector<HTMLInputElement>(".scene-characters")?.value ?? "")
      .split(",").map((name) => name.trim()).filter(Boolean);
  });
  return board;
}

async function saveBoard(): Promise<Job | null> {
  const job = current?.job;
  if (!current || !job) return null;
  clearError();
  const button = $<HTMLButtonElement>("save-storyboard");
  button.disabled = true;
  try {
    const answer = await api.updateStoryboard({
      jobId: job.jobId,
      storyboard: editedBoard(job),
      version: job.storyboardVersion,
    });
    current.boardDirty = false;
    status(finished(job.state)
      ? "Saved: a new run draws the changed scenes and composes a new version."
      : "Saved.");
    if (answer.job) render(answer.job);
    if (finished(job.state)) follow(job.generation + 1);
    return answer.job ?? null;
  } catch (error) {
    if (isCode(error, Code.Aborted)) {
      $("direct").dataset.stale = "1";
      showError(error);
      await reload();
    } else {
      showError(error);
    }
    return null;
  } finally {
    button.disabled = false;
  }
}

async function approve(): Promise<void> {
  if (!current?.job) return;
  let job: Job | null = current.job;
  if (current.boardDirty) job = await saveBoard();
  if (!job) return;
  clearError();
  try {
    const answer = await api.approveStoryboard({ jobId: job.jobId, version: job.storyboardVersion });
    status("Approved: the scenes are being drawn.");
    if (answer.job) render(answer.job);
    follow();
  } catch (error) {
    showError(error);
  }
}

async function regenerate(index: number): Promise<void> {
  const job = current?.job;
  if (!job) return;
  clearError();
  const row = document.getElementById(`board-scene-${index}-prompt`) as HTMLTextAreaElement | null;
  const prompt = row?.value.trim() ?? "";
  const changed = prompt && prompt !== job.storyboard?.scenes[index - 1]?.imagePrompt;
  try {
    const answer = await api.regenerateScene(
      changed ? { jobId: job.jobId, index, prompt } : { jobId: job.jobId, index, seed: randomSeed() },
    );
    status(`Scene ${index} is being drawn again${changed ? " from its new prompt" : " with a new seed"}.`);
    if (answer.job) render(answer.job);
    follow(job.generation + 1);
  } catch (error) {
    showError(error);
  }
}

async function reload(): Promise<void> {
  if (!current) return;
  try {
    const answer = await api.getJob({ jobId: current.jobId });
    render(answer.job);
  } catch (error) {
    showError(error);
  }
}

// --- the result ------------------------------------------------------------------------------

async function renderResult(job: Job): Promise<void> {
  const section = $("result");
  if (!current) return;
  renderVersions(job);
  renderWarnings(job.warnings);
  // While a new run composes another version, the one shown stays (and plays).
  if (!job.videoUri || current.videoUri === job.videoUri) {
    section.hidden = current.videoUri === "";
    return;
  }
  current.videoUri = job.videoUri;
  await showVideo(job, job.videoUri, job.captionsVtt?.uri ?? "", job.captionsSrt?.uri ?? "",
    job.poster?.uri ?? "", job.contactSheet?.uri ?? "");
}

/** What to know of the latest video (captions shown in part, characters no font has...). */
function renderWarnings(warnings: string[]): void {
  const list = $("warnings");
  list.replaceChildren(...warnings.map((warning) => el("li", {}, warning)));
  list.hidden = warnings.length === 0;
}

async function showVideo(
  job: Job, video: string, vtt: string, srt: string, poster: string, sheet: string,
): Promise<void> {
  try {
    const [videoUrl, vttUrl, srtUrl, posterUrl, sheetUrl] = await Promise.all(
      [video, vtt, srt, poster, sheet].map((uri) => (uri ? artifactUrl(uri) : Promise.resolve(""))),
    );
    if (!current || current.jobId !== job.jobId) return;
    const player = $<HTMLVideoElement>("video");
    player.querySelectorAll("track").forEach((track) => track.remove());
    if (vttUrl) {
      const track = el("track", { id: "captions-track", kind: "captions", srclang: "en",
        label: "Captions", src: vttUrl });
      player.append(track);
      // Shown over a clean picture (sidecar captions); loaded but hidden when the captions
      // are burned in already (the player's menu can still show them).
      track.track.mode = job.captions === Captions.SIDECAR ? "showing" : "hidden";
    }
    if (posterUrl) player.poster = posterUrl;
    player.src = videoUrl;
    player.dataset.uri = video;
    const name = slug(job);
    const mp4 = $<HTMLAnchorElement>("download-video");
    mp4.href = videoUrl;
    mp4.download = `${name}.mp4`;
    for (const [id, url, ext] of [["download-vtt", vttUrl, "vtt"], ["download-srt", srtUrl, "srt"]]) {
      const link = $<HTMLAnchorElement>(id);
      link.hidden = !url;
      link.href = url || "#";
      link.download = `${name}.${ext}`;
    }
    $("poster-figure").hidden = !posterUrl;
    if (posterUrl) $<HTMLImageElement>("poster").src = posterUrl;
    $("sheet-figure").hidden = !sheetUrl;
    if (sheetUrl) $<HTMLImageElement>("contact-sheet").src = sheetUrl;
    $("result").hidden = false;
  } catch (error) {
    showError(error);
  }
}

function renderVersions(job: Job): void {
  const list = $("versions");
  const byGeneration = new Map<number, ArtifactVersion[]>();
  for (const version of job.versions) {
    if (version.sceneIndex !== 0) continue;
    const group = byGeneration.get(version.generation) ?? [];
    group.push(version);
    byGeneration.set(version.generation, group);
  }
  const videos = [...byGeneration.entries()]
    .filter(([, group]) => group.some((v) => v.kind === ArtifactKind.VIDEO))
    .sort(([a], [b]) => b - a);
  const key = videos.map(([g]) => g).join(",") + `|${job.videoUri}`;
  if (list.dataset.key === key) return;
  list.dataset.key = key;
  list.replaceChildren(
    ...videos.map(([generation, group]) => {
      const find = (kind: ArtifactKind) => group.find((v) => v.kind === kind)?.uri ?? "";
      const videoUri = find(ArtifactKind.VIDEO);
      const latest = videoUri === job.videoUri;
      const created = when(group.find((v) => v.kind === ArtifactKind.VIDEO)?.createdAt);
      const play = el("button", { type: "button", text: `Play version ${generation + 1}` });
      play.addEventListener("click", () => {
        void showVideo(job, videoUri, find(ArtifactKind.CAPTIONS_VTT), find(ArtifactKind.CAPTIONS_SRT),
          find(ArtifactKind.POSTER), find(ArtifactKind.CONTACT_SHEET));
      });
      const save = el("button", { type: "button", text: `Download version ${generation + 1}` });
      save.addEventListener("click", async () => {
        try {
          const url = await artifactUrl(videoUri);
          const link = el("a", { href: url, download: `${slug(job)}-v${generation + 1}.mp4` });
          document.body.append(link);
          link.click();
          link.remove();
        } catch (error) {
          showError(error);
        }
      });
      const item = el("li", { class: "version" },
        el("span", { text: `Version ${generation + 1}${latest ? " (current)" : ""}${created ? `, ${created}` : ""}` }),
        " ", play, " ", save);
      item.dataset.uri = videoUri;
      return item;
    }),
  );
}

// --- jobs --------------------------------------------------------------------------------------

let nextPage = "";

function jobRow(job: Job): HTMLTableRowElement {
  const title = job.storyboard?.title || job.prompt || job.jobId;
  const open = el("button", { type: "button", "aria-label": `Open ${title}`, text: "Open" });
  open.addEventListener("click", () => openJob(job.jobId, true));
  const cancel = el("button", { type: "button", class: "cancel-row", "aria-label": `Cancel ${title}`,
    text: "Cancel" });
  cancel.hidden = !cancellable(job.state);
  cancel.addEventListener("click", () => void cancelJob(job.jobId));
  const row = el("tr", { id: `row-${job.jobId}` },
    el("td", { text: when(job.createdAt) }),
    el("td", { class: "title", title: job.prompt, text: shortened(title) }),
    el("td", { class: "state", text: STATE_NAMES[job.state] }),
    el("td", { class: "actions" }, open, " ", cancel));
  row.dataset.jobId = job.jobId;
  return row;
}

function renderJobs(page: ListJobsResponse, append: boolean): void {
  const body = $("jobs-table").querySelector("tbody");
  if (!body) return;
  const rows = page.jobs.map(jobRow);
  if (append) body.append(...rows);
  else body.replaceChildren(...rows);
  nextPage = page.nextPageToken;
  $("more-jobs").hidden = !nextPage;
  $("jobs-empty").hidden = body.children.length > 0;
}

function updateJobRow(job: Job): void {
  const row = document.getElementById(`row-${job.jobId}`);
  if (!row) return;
  const state = row.querySelector(".state");
  if (state) state.textContent = STATE_NAMES[job.state];
  const cancel = row.querySelector<HTMLElement>(".cancel-row");
  if (cancel) cancel.hidden = !cancellable(job.state);
}

async function refreshJobs(): Promise<void> {
  try {
    renderJobs(await api.listJobs({ pageSize: 20 }), false);
  } catch (error) {
    showError(error);
  }
}

async function cancelJob(jobId: string): Promise<void> {
  clearError();
  try {
    const answer = await api.cancelJob({ jobId });
    if (answer.job) {
      updateJobRow(answer.job);
      if (current?.jobId === jobId) {
        render(answer.job);
        status("Cancelled.");
      }
    }
  } catch (error) {
    showError(error);
  }
}

// --- write -------------------------------------------------------------------------------------

async function createVideo(event: SubmitEvent): Promise<void> {
  event.preventDefault();
  clearError();
  const button = $<HTMLButtonElement>("create");
  button.disabled = true;
  const number = (id: string) => Number($<HTMLInputElement | HTMLSelectElement>(id).value || 0);
  try {
    let audioUri = "";
    let audioMode = 0;
    const soundtrack = $<HTMLInputElement>("soundtrack").files?.[0];
    const said = $("write-status");
    said.textContent = "";
    if (soundtrack) {
      said.textContent = `Uploading ${soundtrack.name}…`;
      const uploaded = await uploadAudio(soundtrack);
      said.textContent = `Uploaded ${soundtrack.name}: ${uploaded.durationS.toFixed(1)} s of ` +
        `${uploaded.codec} audio.`;
      audioUri = uploaded.audioUri;
      audioMode = number("audio-mode");
    }
    const answer = await api.createVideo({
      prompt: $<HTMLTextAreaElement>("prompt").value.trim(),
      sceneCount: number("scenes"),
      style: $<HTMLInputElement>("style").value.trim(),
      aspect: number("aspect"),
      resolution: number("resolution"),
      captions: number("captions"),
      consistency: number("consistency"),
      voice: $<HTMLInputElement>("voice").value.trim(),
      seed: BigInt(Math.max(0, Math.floor(number("seed")))),
      audioUri,
      audioMode,
      review: $<HTMLInputElement>("review").checked,
      idempotencyKey: newKey(),
    });
    said.textContent = `${said.textContent} Job ${answer.jobId} created.`.trim();
    openJob(answer.jobId, true);
    void refreshJobs();
  } catch (error) {
    $("write-status").textContent = "";
    showError(error);
  } finally {
    button.disabled = false;
  }
}

// --- start -------------------------------------------------------------------------------------

function jobFromLocation(): string {
  const match = /(?:^#|&)job=([^&]+)/.exec(location.hash);
  if (match?.[1]) return decodeURIComponent(match[1]);
  return sessionStorage.getItem(JOB_ITEM) ?? "";
}

async function start(): Promise<void> {
  $("error-dismiss").addEventListener("click", clearError);
  $("write-form").addEventListener("submit", (event) => void createVideo(event as SubmitEvent));
  $("access-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    setApiKey($<HTMLInputElement>("api-key").value.trim());
    $("access-message").textContent = "Checking the key…";
    if (await connect()) resume();
  });
  $("forget-key").addEventListener("click", () => {
    setApiKey("");
    $<HTMLInputElement>("api-key").value = "";
    void connect();
  });
  $("change-key").addEventListener("click", () => askForKey(""));
  $("refresh-jobs").addEventListener("click", () => void refreshJobs());
  $("more-jobs").addEventListener("click", async () => {
    try {
      renderJobs(await api.listJobs({ pageSize: 20, pageToken: nextPage }), true);
    } catch (error) {
      showError(error);
    }
  });
  $("cancel").addEventListener("click", () => current && void cancelJob(current.jobId));
  $("close-job").addEventListener("click", closeJob);
  $("storyboard-form").addEventListener("submit", (event) => {
    event.preventDefault();
    void saveBoard();
  });
  $("storyboard-form").addEventListener("input", markDirty);
  $("approve").addEventListener("click", () => void approve());
  window.addEventListener("hashchange", () => {
    const id = jobFromLocation();
    if (id && id !== current?.jobId) openJob(id);
  });
  if (await connect()) resume();
}

function resume(): void {
  const id = jobFromLocation();
  if (id) openJob(id);
}

void start();
