// Sign one HTTP request with an RFC 9421 implementation independent of fedgate's
// (the npm package "http-message-signatures"), for tests/test_interop.py.
// usage: node sign_request.mjs KEY.pem KEYID METHOD URL BODYFILE  -> JSON headers on stdout
import { readFileSync } from "node:fs";
import { createHash, createPrivateKey, randomBytes } from "node:crypto";
import { createSigner, httpbis } from "http-message-signatures";

const [keyPath, keyId, method, url, bodyPath] = process.argv.slice(2);
const body = readFileSync(bodyPath);
const headers = {
  "content-type": "application/json",
  "content-digest": `sha-256=:${createHash("sha256").update(body).digest("base64")}:`,
};
const key = createSigner(createPrivateKey(readFileSync(keyPath)), "ed25519", keyId);
const now = new Date(Math.floor(Date.now() / 1000) * 1000);
const signed = await httpbis.signMessage(
  {
    key,
    name: "interop",
    fields: ["@method", "@target-uri", "content-digest", "content-type"],
    params: ["created", "expires", "nonce", "keyid", "alg", "tag"],
    paramValues: {
      created: now,
      expires: new Date(now.getTime() + 60_000),
      nonce: randomBytes(16).toString("base64url"),
      tag: "fedgate",
    },
  },
  { method, url, headers },
);
process.stdout.write(JSON.stringify(signed.headers));
