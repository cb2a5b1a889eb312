// The browser half of attaching a document (chatglm_web/page/attachments.py): the 📎 button opens a file
// picker, the file is read here (FileReader, base64) and handed to the server as a string through the hidden
// #attach-go button; a pending chip's ✕ hands its id through #detach-go. Nothing is uploaded as a file.
window.chatglmDocs = (() => {
  const docs = {
    picked: null,
    removing: null,
    take: () => { const picked = docs.picked; docs.picked = null; return picked; },
  };
  const read = (file, limit) => new Promise((resolve) => {
    if (file.size > limit) return resolve({ name: file.name, size: file.size, error: "too_large" });
    const reader = new FileReader();
    reader.onload = () => {
      const url = String(reader.result || "");
      resolve({ name: file.name, size: file.size, data: url.slice(url.indexOf(",") + 1) });
    };
    reader.onerror = () => resolve({ name: file.name, size: file.size, error: "unreadable" });
    reader.readAsDataURL(file);
  });
  document.addEventListener("click", (event) => {
    const target = event.target;
    if (!target || !target.closest) return;
    const attach = target.closest("#attach .attach-button");
    if (attach) {
      event.preventDefault();
      const input = Object.assign(document.createElement("input"), { type: "file", accept: attach.dataset.accept || "" });
      input.addEventListener("change", async () => {
        const file = input.files && input.files[0];
        if (!file) return;
        docs.picked = await read(file, Number(attach.dataset.limit || 0) || Infinity);
        document.querySelector("#attach-go")?.click();
      });
      input.click();
      return;
    }
    const remove = target.closest("#attachments .chip-remove");
    if (remove) {
      event.preventDefault();
      docs.removing = remove.dataset.doc || null;
      document.querySelector("#detach-go")?.click();
    }
  }, true);
  return docs;
})();
