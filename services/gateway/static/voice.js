// A voice turn: the microphone recorded (MediaRecorder), turned into 16 kHz mono WAV here (the
// browser records WebM/Opus, which the gateway's audio library does not read), transcribed,
// answered by the assistant in the chat's conversation, and the answer spoken and played.
import { call, getJson, el } from "./api.js";
import { askAssistant } from "./chat.js";

const RATE = 16000;
const MAX_SPEECH_CHARS = 4096;
let recorder = null;

function say(message, isError = false) {
  const status = document.getElementById("voice-status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

// 16-bit PCM WAV of mono samples in [-1, 1].
function wav(samples, rate) {
  const buffer = new ArrayBuffer(44 + samples.length * 2);
  const view = new DataView(buffer);
  const text = (offset, value) => { for (let i = 0; i < value.length; i += 1) view.setUint8(offset + i, value.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true); view.setUint16(34, 16, true);
  text(36, "data"); view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i += 1) {
    const sample = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + i * 2, sample < 0 ? sample * 0x8000 : sample * 0x7fff, true);
  }
  return new Blob([buffer], { type: "audio/wav" });
}

// Whatever the browser recorded, decoded by the browser, down-mixed and resampled to 16 kHz.
async function toWav(blob) {
  const context = new AudioContext();
  try {
    const decoded = await context.decodeAudioData(await blob.arrayBuffer());
    const offline = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * RATE)), RATE);
    const source = offline.createBufferSource();
    source.buffer = decoded;
    source.connect(offline.destination);
    source.start();
    return wav((await offline.startRendering()).getChannelData(0), RATE);
  } finally {
    context.close();
  }
}

async function voiceTurn(audio, name) {
  const turn = document.getElementById("voice-turn");
  const player = document.getElementById("voice-audio");
  const [engine, voice] = JSON.parse(document.getElementById("voice-select").value || "[]");
  player.hidden = true;
  say("Transcribing…");
  try {
    const form = new FormData();
    form.append("file", audio, name);
    form.append("model", "pocketsphinx");
    const heard = (await (await call("/v1/audio/transcriptions", { method: "POST", form, traced: "voice: transcription" })).json()).text.trim();
    if (!heard) {
      say("Nothing was understood in the recording: speak closer to the microphone and try again.", true);
      return;
    }
    turn.replaceChildren();
    say("Answering…");
    const { answer } = await askAssistant(turn, heard, "voice: answer");
    if (!engine || !answer.trim()) {
      say(engine ? "The assistant gave no answer to speak." : "No voice is served: the answer is shown only.", !engine);
      return;
    }
    say("Speaking the answer…");
    const spoken = await call("/v1/audio/speech", { method: "POST", traced: "voice: speech",
      json: { model: engine, voice, input: answer.slice(0, MAX_SPEECH_CHARS), response_format: "wav" } });
    if (player.src) URL.revokeObjectURL(player.src);
    player.src = URL.createObjectURL(await spoken.blob());
    player.hidden = false;
    say("Playing the answer.");
    await player.play().catch(() => say("The answer is ready: press play."));
  } catch (error) {
    say(`The voice turn failed: ${error.message}`, true);
  }
}

async function startRecording(button) {
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
  } catch (error) {
    say(`No microphone: ${error.message}. Send an audio file instead.`, true);
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.addEventListener("dataavailable", (event) => { if (event.data.size) chunks.push(event.data); });
  recorder.addEventListener("stop", async () => {
    for (const track of stream.getTracks()) track.stop();
    recorder = null;
    button.setAttribute("aria-pressed", "false");
    button.textContent = "Start recording";
    try {
      const recorded = new Blob(chunks, { type: chunks[0] ? chunks[0].type : "audio/webm" });
      await voiceTurn(await toWav(recorded), "recording.wav");
    } catch (error) {
      say(`The recording could not be read: ${error.message}`, true);
    }
  });
  recorder.start();
  button.setAttribute("aria-pressed", "true");
  button.textContent = "Stop recording";
  say("Recording… press again to stop and send.");
}

export async function loadVoices() {
  const select = document.getElementById("voice-select");
  try {
    const models = (await getJson("/v1/models")).data;
    const options = [];
    for (const model of models.filter((entry) => entry.llmos && entry.llmos.role === "speech")) {
      for (const voice of model.llmos.voices || []) {
        options.push(el("option", { value: JSON.stringify([model.id, voice]) }, `${voice} (${model.id})`));
      }
    }
    select.replaceChildren(...options);
    if (!options.length) say("No voice is served: answers are shown, not spoken.");
  } catch (error) {
    say(`Cannot list the voices: ${error.message}`, true);
  }
}

export function setUpVoice() {
  const button = document.getElementById("record");
  if (!window.isSecureContext || !navigator.mediaDevices || !window.MediaRecorder) {
    button.disabled = true;
    say("The microphone needs a secure page (https, or this machine as 127.0.0.1/localhost): send an audio file instead.");
  }
  button.addEventListener("click", () => {
    if (recorder) recorder.stop();
    else startRecording(button);
  });
  const file = document.getElementById("voice-file");
  file.addEventListener("change", () => {
    const [chosen] = file.files;
    file.value = "";
    if (!chosen) return;
    // What the browser can decode goes as WAV (WebM, M4A…); anything else as it is, for the gateway to read or refuse.
    toWav(chosen).then((converted) => voiceTurn(converted, "upload.wav"), () => voiceTurn(chosen, chosen.name));
  });
}
