// gradhub dashboard: every element with data-refresh="URL" and data-live="true" has its
// content replaced by what URL returns, every two seconds, until the server answers
// "X-Gradhub-Live: false" (the job ended); then elements marked data-while-live go away.
"use strict";

const EVERY_MS = 2000;

function follow(el) {
  const tick = async () => {
    if (!document.hidden) {
      try {
        const response = await fetch(el.dataset.refresh, {credentials: "same-origin", cache: "no-store"});
        if (response.status === 401) {  // signed out: the page itself goes to /login
          location.reload();
          return;
        }
        if (response.ok) {
          el.innerHTML = await response.text();  // the server escaped everything in it
          if (response.headers.get("X-Gradhub-Live") === "false") {
            el.dataset.live = "false";
            document.querySelectorAll("[data-while-live]").forEach((x) => x.remove());
            return;
          }
        }
      } catch (e) {
        // the server is away for a moment: try again at the next tick
      }
    }
    setTimeout(tick, EVERY_MS);
  };
  setTimeout(tick, EVERY_MS);
}

document.querySelectorAll("[data-refresh][data-live=true]").forEach(follow);
